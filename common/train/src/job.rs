//! Job settings: a `JobRequest` carries its settings as a map from long flag
//! name (without dashes) to value, which trainers parse with the same clap
//! `Settings` as their command line.

use std::collections::BTreeMap;

/// Command-line arguments for `settings`: `program`, then `--key value` per
/// entry in key order. A key given with leading dashes keeps them once, so
/// `learning-rate` and `--learning-rate` both become `--learning-rate`.
pub fn settings_args(program: &str, settings: &BTreeMap<String, String>) -> Vec<String> {
    let mut args = vec![program.to_string()];
    for (key, value) in settings {
        // `--key=value` keeps a value that starts with `-` from reading as a flag.
        args.push(format!("--{}={value}", key.trim_start_matches('-')));
    }
    args
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn map_becomes_flags() {
        let settings = BTreeMap::from([
            ("steps".to_string(), "20".to_string()),
            ("--learning-rate".to_string(), "-1".to_string()),
        ]);
        assert_eq!(
            settings_args("x", &settings),
            ["x", "--learning-rate=-1", "--steps=20"]
        );
    }
}
