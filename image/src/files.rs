//! The files the image adds to the Debian base: the agent's configuration,
//! systemd units, mounts, network, and the boot loader's entries. Plain
//! functions of the layout and the build's settings, so they are tested and
//! read here, not scattered over a script.

use crate::layout::Layout;

/// Where the data partition is mounted (and the agent's state directory).
pub const DATA_DIR: &str = "/var/lib/edge";
/// The model's place in the root filesystem.
pub const MODEL_DIR: &str = "/usr/share/edge/models";
/// The agent's configuration.
pub const AGENT_CONFIG: &str = "/etc/edge-agent/edge-agent.toml";
/// The agent's user and group (fixed ids: builds match).
pub const AGENT_USER: &str = "edge-agent";
/// Its uid and gid.
pub const AGENT_UID: u32 = 990;
/// The serial port the provisioning listener answers on.
pub const PROVISION_TTY: &str = "ttyS1";
/// Boot tries a new slot gets before systemd-boot falls back.
pub const BOOT_TRIES: u32 = 3;

/// `/etc/fstab`: the ESP (for boot counting), the data partition, and
/// tmpfs where a read-only root needs writes.
pub fn fstab(layout: &Layout) -> String {
    let uuid = |n: &str| {
        layout
            .get(n)
            .map(|p| p.uuid.to_lowercase())
            .unwrap_or_default()
    };
    format!(
        "# The root is read-only, named on the kernel command line by its slot.\n\
         # The ESP: root writes it; the agent's group reads it (slot status\n\
         # for the technician's serial console).\n\
         PARTUUID={esp}\t/efi\tvfat\tumask=0027,gid={AGENT_UID},nofail\t0\t2\n\
         PARTUUID={data}\t{DATA_DIR}\text4\tdefaults,noatime,nosuid,nodev\t0\t2\n\
         tmpfs\t/tmp\ttmpfs\tmode=1777,nosuid,nodev\t0\t0\n\
         tmpfs\t/var/tmp\ttmpfs\tmode=1777,nosuid,nodev\t0\t0\n\
         tmpfs\t/var/lib/systemd\ttmpfs\tmode=0755\t0\t0\n",
        esp = uuid("esp"),
        data = uuid("edge-data"),
    )
}

/// The agent's configuration in the image: state on the data partition,
/// the model from the root, the API on every interface (the box serves its
/// cell), the admin API on loopback, one app whose key hash the build was
/// given.
pub fn agent_config(model_file: &str, model_id: &str, app_key_sha256: &str) -> String {
    format!(
        "# The image's configuration. Provisioning (edgeprov) writes {DATA_DIR}/site.toml,\n\
         # which sets the node id, the core and the API address over this file.\n\
         [node]\n\
         id = \"edge-unprovisioned\"\n\
         state_dir = \"{DATA_DIR}\"\n\
         \n\
         [api]\n\
         listen = \"0.0.0.0:8080\"\n\
         \n\
         [admin]\n\
         listen = \"127.0.0.1:8081\"\n\
         \n\
         [model]\n\
         path = \"{MODEL_DIR}/{model_file}\"\n\
         id = \"{model_id}\"\n\
         \n\
         [[apps]]\n\
         id = \"image-app\"\n\
         key_sha256 = \"{app_key_sha256}\"\n\
         imsi_prefixes = [\"00101\", \"00102\"]\n\
         models = [\"*\"]\n"
    )
}

/// What both of the box's services share: the agent's user, the state
/// directory on the data partition, and the base of the sandbox.
fn service_common() -> String {
    format!(
        "User={AGENT_USER}\n\
         Group={AGENT_USER}\n\
         StateDirectory=edge\n\
         StateDirectoryMode=0750\n\
         Environment=EDGE_AGENT_LOG=info\n\
         NoNewPrivileges=yes\n\
         ProtectSystem=strict\n\
         ProtectHome=yes\n\
         PrivateTmp=yes\n"
    )
}

/// `edge-agent.service`: hardened; started once the box is provisioned.
pub fn agent_unit() -> String {
    format!(
        "# The MEC edge agent. Starts once provisioning wrote {DATA_DIR}/site.toml\n\
         # (edge-agent.path starts it when the file appears).\n\
         [Unit]\n\
         Description=MEC edge agent (OpenAI-compatible MEC API, token metering, usage log)\n\
         After=network-online.target local-fs.target efi.mount\n\
         Wants=network-online.target efi.mount\n\
         ConditionPathExists={DATA_DIR}/site.toml\n\
         # Five failed starts in two minutes and it stays down (the boot's\n\
         # health check sees that at once).\n\
         StartLimitIntervalSec=120\n\
         StartLimitBurst=5\n\
         \n\
         [Service]\n\
         Type=notify\n\
         ExecStart=/usr/bin/edge-agent serve --config {AGENT_CONFIG}\n\
         WatchdogSec=60\n\
         TimeoutStartSec=600\n\
         TimeoutStopSec=90\n\
         Restart=on-failure\n\
         RestartSec=2\n\
         {common}\
         PrivateDevices=yes\n\
         ProtectKernelTunables=yes\n\
         ProtectKernelModules=yes\n\
         ProtectKernelLogs=yes\n\
         ProtectControlGroups=yes\n\
         ProtectClock=yes\n\
         ProtectHostname=yes\n\
         ProtectProc=invisible\n\
         ProcSubset=pid\n\
         RestrictNamespaces=yes\n\
         RestrictRealtime=yes\n\
         RestrictSUIDSGID=yes\n\
         LockPersonality=yes\n\
         MemoryDenyWriteExecute=yes\n\
         RemoveIPC=yes\n\
         CapabilityBoundingSet=\n\
         AmbientCapabilities=\n\
         RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX AF_NETLINK\n\
         SystemCallArchitectures=native\n\
         # io_uring is not in @system-service: allow it, or the log's file\n\
         # backend is taken (and logged).\n\
         SystemCallFilter=@system-service io_uring_setup io_uring_enter io_uring_register\n\
         SystemCallFilter=~@privileged @resources\n\
         SystemCallErrorNumber=EPERM\n\
         UMask=0077\n\
         DevicePolicy=closed\n\
         IPAddressDeny=\n\
         \n\
         [Install]\n\
         WantedBy=multi-user.target\n",
        common = service_common(),
    )
}

/// `edge-agent.path`: starts the agent when provisioning completes.
pub fn agent_path_unit() -> String {
    format!(
        "[Unit]\n\
         Description=Start the MEC edge agent once the box is provisioned\n\
         \n\
         [Path]\n\
         PathExists={DATA_DIR}/site.toml\n\
         Unit=edge-agent.service\n\
         \n\
         [Install]\n\
         WantedBy=multi-user.target\n"
    )
}

/// `edge-provision.service`: the provisioning listener on the second serial
/// port, always up (status, authorised resets).
pub fn provision_unit() -> String {
    format!(
        "[Unit]\n\
         Description=MEC edge box: serial provisioning listener on {PROVISION_TTY}\n\
         # The slots it reports live on the ESP, which fstab mounts `nofail`\n\
         # (local-fs.target does not wait for it): wait here.\n\
         After=local-fs.target efi.mount dev-{PROVISION_TTY}.device\n\
         Wants=efi.mount\n\
         BindsTo=dev-{PROVISION_TTY}.device\n\
         \n\
         [Service]\n\
         Type=simple\n\
         # The DMI serial is root's to read: a privileged step copies it for the\n\
         # listener (the box's id as technicians see it).\n\
         RuntimeDirectory=edge-provision\n\
         ExecStartPre=-+/bin/sh -c 'cat /sys/class/dmi/id/product_serial > /run/edge-provision/product_serial'\n\
         ExecStart=/usr/bin/edge-agent provision-listen --port /dev/{PROVISION_TTY} --baud 115200 --state-dir {DATA_DIR}\n\
         Restart=always\n\
         RestartSec=2\n\
         SupplementaryGroups=dialout\n\
         {common}\
         PrivateNetwork=yes\n\
         DevicePolicy=closed\n\
         DeviceAllow=/dev/{PROVISION_TTY} rw\n\
         \n\
         [Install]\n\
         WantedBy=multi-user.target\n",
        common = service_common(),
    )
}

/// How long the agent must stay ready before a boot counts as good.
pub const HEALTHY_AFTER_S: u64 = 60;

/// `edge-boot-health.service`: required by `boot-complete.target`, so
/// systemd-bless-boot marks the boot good only after it succeeds:
/// `edge-agent boot-health` (the agent ready for a minute without a break
/// and the usage log verified; on a box not provisioned yet, the
/// provisioning listener up). On a boot being tried it fails and reboots,
/// so systemd-boot counts the try and, after the last, boots the old slot.
pub fn health_unit() -> String {
    format!(
        "[Unit]\n\
         Description=MEC edge box: is this boot good?\n\
         After=edge-agent.service edge-provision.service\n\
         Before=boot-complete.target\n\
         \n\
         [Service]\n\
         Type=oneshot\n\
         RemainAfterExit=yes\n\
         TimeoutStartSec=900\n\
         ExecStart=/usr/bin/edge-agent boot-health --config {AGENT_CONFIG} --ready-for {HEALTHY_AFTER_S} --timeout 600\n\
         # 3: bad, but this boot is not on trial (no slot to fall back to).\n\
         SuccessExitStatus=3\n\
         # The verdict, one JSON line, on the console too.\n\
         StandardOutput=journal+console\n\
         FailureAction=reboot\n\
         {common}\
         \n\
         [Install]\n\
         RequiredBy=boot-complete.target\n",
        common = service_common(),
    )
}

/// What the console says once systemd-bless-boot has marked this boot
/// good (the boot's status lines stop when startup finishes, which may be
/// before it runs: the technician and the QEMU test read this instead).
pub const BOOT_BLESSED_LINE: &str = "edge-boot: this boot is marked good";

/// A drop-in for `systemd-bless-boot.service`: one console line once it
/// marked the boot good (only when it ran, and succeeded).
pub fn bless_boot_dropin() -> String {
    format!(
        "[Service]\n\
         StandardOutput=journal+console\n\
         ExecStartPost=/bin/echo \"{BOOT_BLESSED_LINE}\"\n"
    )
}

/// Where udev's rule for update sticks goes.
pub const UPDATE_MEDIA_RULE: &str = "/etc/udev/rules.d/80-edge-update-media.rules";

/// The udev rule: a whole USB disk plugged in starts
/// `edge-update-media@<kernel name>.service`, which tries it as a bundle.
/// Partitions are not tried: a bundle is written raw to the stick
/// (`dd if=edge-VERSION.bundle of=/dev/sdX`).
pub fn update_media_rule() -> &'static str {
    "# A USB disk may carry an update bundle, written raw to the whole disk:\n\
     # edge-update-media@.service tries it (a stick that is not a bundle signed\n\
     # by the operator's key is refused and nothing is written).\n\
     ACTION==\"add\", SUBSYSTEM==\"block\", ENV{DEVTYPE}==\"disk\", ENV{ID_BUS}==\"usb\", \
     TAG+=\"systemd\", ENV{SYSTEMD_WANTS}+=\"edge-update-media@%k.service\"\n"
}

/// What both root update services share: they write the ESP (and the
/// other slot's partition under `/dev`, the EFI variables under `/sys`),
/// nothing else, and need no network.
const ROOT_UPDATE_SERVICE: &str = "Environment=EDGE_AGENT_LOG=info\n\
     NoNewPrivileges=yes\n\
     ProtectSystem=strict\n\
     ReadWritePaths=/efi\n\
     ProtectHome=yes\n\
     PrivateTmp=yes\n\
     PrivateNetwork=yes\n";

/// `edge-update-media@.service`: applies the bundle on a plugged USB disk,
/// then reboots into it; the JSON progress goes to the console and the
/// journal. Root: it writes the ESP and the other slot's partition. A
/// refusal (exit 3) writes nothing and does not reboot; pulling the stick
/// stops the apply, which leaves the other slot unbootable and the running
/// one booting.
pub fn update_media_unit() -> String {
    format!(
        "[Unit]\n\
         Description=MEC edge box: update from the USB disk /dev/%I\n\
         BindsTo=dev-%i.device\n\
         After=dev-%i.device local-fs.target efi.mount\n\
         Wants=efi.mount\n\
         \n\
         [Service]\n\
         Type=oneshot\n\
         ExecStart=/usr/bin/edge-agent update apply --bundle /dev/%I --config {AGENT_CONFIG}\n\
         ExecStartPost=/usr/bin/systemctl --no-block reboot\n\
         StandardOutput=journal+console\n\
         StandardError=journal+console\n\
         {hardening}",
        hardening = ROOT_UPDATE_SERVICE,
    )
}

/// The update service's socket: root owns it, the agent's group may
/// connect (the admin API's `/admin/v1/update`); one connection at a time,
/// each served by an `edge-update@.service` of its own.
pub fn update_socket_unit() -> String {
    format!(
        "[Unit]\n\
         Description=MEC edge box: update service socket (for the agent's admin API)\n\
         \n\
         [Socket]\n\
         ListenStream=/run/edge-update.sock\n\
         SocketUser=root\n\
         SocketGroup={AGENT_USER}\n\
         SocketMode=0660\n\
         Accept=yes\n\
         MaxConnections=2\n\
         \n\
         [Install]\n\
         WantedBy=sockets.target\n"
    )
}

/// One request of the update service (`edge-agent update serve-stdio`), as
/// root: it writes the ESP and the other slot's partition.
pub fn update_service_unit() -> String {
    format!(
        "[Unit]\n\
         Description=MEC edge box: update service (one request)\n\
         After=efi.mount\n\
         Wants=efi.mount\n\
         \n\
         [Service]\n\
         ExecStart=/usr/bin/edge-agent update serve-stdio --config {AGENT_CONFIG}\n\
         StandardInput=socket\n\
         StandardOutput=socket\n\
         StandardError=journal\n\
         {hardening}",
        hardening = ROOT_UPDATE_SERVICE,
    )
}

/// systemd-networkd: DHCP on every wired interface.
pub fn network() -> &'static str {
    "[Match]\nName=en* eth*\n\n[Network]\nDHCP=yes\n"
}

/// journald: the root is read-only, so the journal lives in memory.
pub fn journald() -> &'static str {
    "[Journal]\nStorage=volatile\nRuntimeMaxUse=64M\n"
}

/// `loader/loader.conf`: no `default`, so systemd-boot boots the first
/// entry in its order, which puts entries that failed every try last and
/// otherwise the newest install first (see `mec-update`'s `boot` module);
/// no menu.
pub fn loader_conf() -> &'static str {
    "timeout 0\nconsole-mode keep\neditor no\n"
}

/// The `sort-key` of our loader entries.
pub const LOADER_SORT_KEY: &str = "edge";

/// The image's version file in the root filesystem (JSON: `version`).
pub const IMAGE_INFO: &str = "/usr/share/edge/image.json";

/// The loader entry of `slot` ("a" or "b"), new: `BOOT_TRIES` boot tries
/// (systemd-boot's boot counting: the file name carries `+tries`).
pub fn loader_entry(
    layout: &Layout,
    slot: &str,
    version: &str,
    generation: u64,
) -> (String, String) {
    let root = layout
        .get(&format!("root-{slot}"))
        .map(|p| p.uuid.to_lowercase())
        .unwrap_or_default();
    (
        format!("edge-{slot}+{BOOT_TRIES}.conf"),
        loader_entry_body(slot, &root, version, generation),
    )
}

/// A loader entry's text. `version` is the install's `generation`, which
/// grows with every install, so the newest install sorts first whatever
/// its image version; the image version is in the title.
pub fn loader_entry_body(
    slot: &str,
    root_partuuid: &str,
    version: &str,
    generation: u64,
) -> String {
    format!(
        "title MEC edge box {version} (slot {upper})\n\
         sort-key {LOADER_SORT_KEY}\n\
         version {generation}\n\
         linux /edge-{slot}/vmlinuz\n\
         initrd /edge-{slot}/initrd.img\n\
         options root=PARTUUID={root_partuuid} ro rootwait console=tty0 console=ttyS0,115200 panic=10 edge.slot={slot}\n",
        upper = slot.to_uppercase(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::Sizes;

    #[test]
    fn the_console_says_when_the_boot_is_marked_good() {
        let d = bless_boot_dropin();
        assert!(d.starts_with("[Service]\n"), "{d}");
        assert!(d.contains("StandardOutput=journal+console"), "{d}");
        assert!(
            d.contains(&format!("ExecStartPost=/bin/echo \"{BOOT_BLESSED_LINE}\"")),
            "{d}"
        );
    }

    #[test]
    fn fstab_mounts_the_data_partition_and_the_esp_by_partuuid() {
        let l = Layout::new(Sizes::default());
        let f = fstab(&l);
        let data = l.get("edge-data").unwrap().uuid.to_lowercase();
        assert!(
            f.contains(&format!("PARTUUID={data}\t/var/lib/edge\text4")),
            "{f}"
        );
        assert!(f.contains("\t/efi\tvfat"), "{f}");
        assert!(!f.lines().any(|l| l.split('\t').nth(1) == Some("/")), "{f}");
    }

    #[test]
    fn a_usb_disk_starts_the_media_update_unit_which_reboots_only_after_an_apply() {
        let rule = update_media_rule();
        assert!(rule.contains("ENV{ID_BUS}==\"usb\""), "{rule}");
        assert!(rule.contains("ENV{DEVTYPE}==\"disk\""), "{rule}");
        assert!(
            rule.contains("SYSTEMD_WANTS}+=\"edge-update-media@%k.service\""),
            "{rule}"
        );
        // One rule, on one logical line.
        assert_eq!(rule.lines().filter(|l| !l.starts_with('#')).count(), 1);
        let unit = update_media_unit();
        assert!(unit.contains("update apply --bundle /dev/%I"), "{unit}");
        // ExecStartPost runs only when ExecStart exited 0 (applied).
        assert!(unit.contains("ExecStartPost=/usr/bin/systemctl --no-block reboot"));
        assert!(
            !unit.contains("SuccessExitStatus"),
            "a refusal must not reboot"
        );
    }

    #[test]
    fn the_slot_a_entry_boots_its_root_with_a_try_counter() {
        let l = Layout::new(Sizes::default());
        let (name, body) = loader_entry(&l, "a", "0.1.0", 1);
        assert_eq!(name, "edge-a+3.conf");
        let root = l.get("root-a").unwrap().uuid.to_lowercase();
        assert!(body.contains(&format!("root=PARTUUID={root} ro")), "{body}");
        assert!(body.contains("console=ttyS0,115200"), "{body}");
    }

    #[test]
    fn the_agent_config_is_one_the_agent_accepts_in_shape() {
        let c = agent_config("m.gguf", "m", &"ab".repeat(32));
        let v: toml::Value = toml::from_str(&c).unwrap();
        assert_eq!(v["node"]["state_dir"].as_str(), Some(DATA_DIR));
        assert_eq!(
            v["model"]["path"].as_str(),
            Some("/usr/share/edge/models/m.gguf")
        );
        assert_eq!(v["apps"][0]["key_sha256"].as_str().unwrap().len(), 64);
    }

    #[test]
    fn the_agent_unit_allows_io_uring_and_waits_for_provisioning() {
        let u = agent_unit();
        assert!(u.contains("io_uring_setup io_uring_enter io_uring_register"));
        assert!(u.contains("ConditionPathExists=/var/lib/edge/site.toml"));
        assert!(u.contains("Type=notify"));
        assert!(u.contains("User=edge-agent"));
        // Whatever reads or writes the slots waits for the ESP, which
        // fstab mounts `nofail` (local-fs.target does not wait for it).
        for unit in [
            &u,
            &provision_unit(),
            &update_service_unit(),
            &update_media_unit(),
        ] {
            for key in ["After=", "Wants="] {
                assert!(
                    unit.lines()
                        .any(|l| l.starts_with(key) && l.contains("efi.mount")),
                    "{key} efi.mount missing from\n{unit}"
                );
            }
        }
        // Every line a key, a section, a comment or blank: nothing glued.
        for unit in [u, provision_unit()] {
            for line in unit.lines() {
                assert!(
                    line.is_empty()
                        || line.starts_with('#')
                        || line.starts_with('[')
                        || (line.contains('=') && !line.starts_with(' ')),
                    "{line:?}"
                );
            }
        }
    }
}
