//! `proxy.toml` validation: any text either loads or is refused with errors that each name a
//! field; it never panics. A loaded configuration summarizes, and reloading it onto itself
//! changes nothing that needs a restart.
#![no_main]

use std::collections::HashMap;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    match sidecache::Config::from_sources(text, &HashMap::new()) {
        Ok(mut config) => {
            let _ = config.summary();
            let running = config.clone();
            assert!(config.keep_restart_only(&running).is_empty());
        }
        Err(errors) => {
            assert!(!errors.0.is_empty());
            for e in &errors.0 {
                assert!(!e.field.is_empty() && !e.message.is_empty(), "{e:?}");
            }
        }
    }
});
