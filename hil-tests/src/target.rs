//! Where the scenarios run: loopback and pseudo-terminals on this machine
//! (the default, and CI's), or a real box in the loop, chosen by environment
//! variables (documented in `hil-tests/README.md`).

use std::path::PathBuf;

/// A real box in the loop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hardware {
    /// The serial device wired to the box's provisioning port.
    pub serial: PathBuf,
    /// The box's MEC API, `http://host:port`.
    pub api: String,
    /// The box's admin API, `http://host:port` (usually an SSH tunnel: it
    /// listens on the box's loopback).
    pub admin: String,
    /// The box's admin token (its `state_dir/admin.token`).
    pub admin_token: String,
    /// An app key the box accepts.
    pub app_key: String,
    /// The relay's address as the box reaches this machine (host:port); the
    /// relay listens on all interfaces at that port.
    pub core_advertise: String,
    /// A shell command that SIGKILLs the box's agent (its unit restarts it),
    /// e.g. `ssh root@box systemctl kill -s SIGKILL edge-agent`.
    pub kill_agent: Option<String>,
}

/// The mode a scenario runs in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mode {
    /// Everything on this machine: processes, ptys, loopback.
    Loopback {
        /// The GPU the local agent is pinned to (`model.gpu`), if any.
        gpu: Option<u32>,
    },
    /// A real box.
    Hardware(Hardware),
}

impl Mode {
    /// The mode the environment asks for.
    pub fn from_env() -> Result<Mode, String> {
        Mode::from_vars(|k| std::env::var(k).ok().filter(|v| !v.is_empty()))
    }

    /// The mode `get` describes (the environment, or a test's table).
    pub fn from_vars(get: impl Fn(&str) -> Option<String>) -> Result<Mode, String> {
        let gpu = match get("MEC_HIL_GPU") {
            Some(v) => Some(
                v.parse::<u32>()
                    .map_err(|_| format!("MEC_HIL_GPU={v:?} is not a GPU index"))?,
            ),
            None => None,
        };
        let serial = get("MEC_HIL_SERIAL");
        let api = get("MEC_HIL_API");
        if serial.is_none() && api.is_none() {
            return Ok(Mode::Loopback { gpu });
        }
        let need = |k: &str| {
            get(k).ok_or_else(|| {
                format!(
                    "{k} is required with MEC_HIL_SERIAL and MEC_HIL_API (see hil-tests/README.md)"
                )
            })
        };
        if gpu.is_some() {
            return Err("MEC_HIL_GPU pins a local agent's GPU; a real box's GPU is set in its own configuration".into());
        }
        Ok(Mode::Hardware(Hardware {
            serial: PathBuf::from(need("MEC_HIL_SERIAL")?),
            api: need("MEC_HIL_API")?.trim_end_matches('/').to_string(),
            admin: need("MEC_HIL_ADMIN")?.trim_end_matches('/').to_string(),
            admin_token: need("MEC_HIL_ADMIN_TOKEN")?,
            app_key: need("MEC_HIL_APP_KEY")?,
            core_advertise: need("MEC_HIL_CORE_ADVERTISE")?,
            kill_agent: get("MEC_HIL_KILL_AGENT"),
        }))
    }

    /// One line saying which mode ran.
    pub fn describe(&self) -> String {
        match self {
            Mode::Loopback { gpu: None } => {
                "mode: loopback (processes on this machine, pty serial line, UDP relay on 127.0.0.1; set MEC_HIL_* for hardware)".into()
            }
            Mode::Loopback { gpu: Some(i) } => {
                format!("mode: loopback with the local agent pinned to GPU {i}")
            }
            Mode::Hardware(h) => format!(
                "mode: hardware (serial {}, API {}, admin {}, core reached at {}, agent kill: {})",
                h.serial.display(),
                h.api,
                h.admin,
                h.core_advertise,
                h.kill_agent.as_deref().unwrap_or("not given, skipped")
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn mode(vars: &[(&str, &str)]) -> Result<Mode, String> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Mode::from_vars(|k| map.get(k).cloned())
    }

    #[test]
    fn no_variables_mean_loopback_and_a_full_set_means_hardware() {
        assert_eq!(mode(&[]), Ok(Mode::Loopback { gpu: None }));
        assert_eq!(
            mode(&[("MEC_HIL_GPU", "1")]),
            Ok(Mode::Loopback { gpu: Some(1) })
        );
        let full = [
            ("MEC_HIL_SERIAL", "/dev/ttyUSB0"),
            ("MEC_HIL_API", "http://10.0.0.5:8080/"),
            ("MEC_HIL_ADMIN", "http://127.0.0.1:18081"),
            ("MEC_HIL_ADMIN_TOKEN", "0123456789abcdef0123456789abcdef"),
            ("MEC_HIL_APP_KEY", "sk-box"),
            ("MEC_HIL_CORE_ADVERTISE", "10.0.0.1:7443"),
        ];
        let Ok(Mode::Hardware(h)) = mode(&full) else {
            panic!("{:?}", mode(&full))
        };
        assert_eq!(h.api, "http://10.0.0.5:8080");
        assert_eq!(h.kill_agent, None);
        assert!(Mode::Hardware(h)
            .describe()
            .contains("agent kill: not given, skipped"));
    }

    #[test]
    fn a_partial_set_or_a_bad_gpu_index_is_an_error_that_names_the_variable() {
        let e = mode(&[("MEC_HIL_SERIAL", "/dev/ttyUSB0")]).unwrap_err();
        assert!(e.contains("MEC_HIL_API"), "{e}");
        let e = mode(&[("MEC_HIL_GPU", "first")]).unwrap_err();
        assert!(e.contains("MEC_HIL_GPU"), "{e}");
    }
}
