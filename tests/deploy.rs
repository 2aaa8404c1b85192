//! The Raspberry Pi deployment scripts: writing rivulet into a disk image
//! built here (partition table, FAT boot and ext4 root file systems), and
//! installing over SSH (with `ssh`/`scp` replaced by recorders).

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::Command;

fn root() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn run(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{cmd:?}: {e} (needs fdisk, dosfstools, e2fsprogs, mtools)"));
    assert!(
        out.status.success(),
        "{cmd:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A 64 MiB image like Raspberry Pi OS's: FAT boot partition, ext4 root.
fn make_image(dir: &Path) -> std::path::PathBuf {
    let img = dir.join("pi.img");
    let f = std::fs::File::create(&img).unwrap();
    f.set_len(64 << 20).unwrap();
    drop(f);
    let mut sf = Command::new("sfdisk");
    sf.arg("--quiet")
        .arg(&img)
        .stdin(std::process::Stdio::piped());
    let mut child = sf.spawn().expect("sfdisk (apt-get install fdisk)");
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"label: dos\nstart=2048, size=32768, type=c\nstart=34816, type=83\n")
        .unwrap();
    assert!(child.wait().unwrap().success());
    run(Command::new("mkfs.vfat")
        .args(["--offset", "2048", "-n", "bootfs"])
        .arg(&img)
        .arg("16384"));
    // The root file system, built apart and copied in at its offset.
    let root = dir.join("root.ext4");
    let f = std::fs::File::create(&root).unwrap();
    f.set_len((131072 - 34816) * 512).unwrap();
    drop(f);
    run(Command::new("mkfs.ext4")
        .args(["-q", "-F", "-L", "rootfs"])
        .arg(&root));
    std::fs::write(
        dir.join("hosts"),
        "127.0.0.1\tlocalhost\n127.0.1.1\traspberrypi\n",
    )
    .unwrap();
    run(Command::new("debugfs")
        .args(["-w", "-R"])
        .arg("mkdir /etc")
        .arg(&root));
    run(Command::new("debugfs")
        .args(["-w", "-R"])
        .arg(format!("write {} /etc/hosts", dir.join("hosts").display()))
        .arg(&root));
    run(Command::new("dd")
        .arg(format!("if={}", root.display()))
        .arg(format!("of={}", img.display()))
        .args(["bs=512", "seek=34816", "conv=notrunc", "status=none"]));
    img
}

fn root_fs_file(dir: &Path, img: &Path, path: &str) -> String {
    let root = dir.join("check.ext4");
    run(Command::new("dd")
        .arg(format!("if={}", img.display()))
        .arg(format!("of={}", root.display()))
        .args(["bs=512", "skip=34816", "status=none"]));
    run(Command::new("debugfs")
        .arg("-R")
        .arg(format!("cat {path}"))
        .arg(&root))
}

#[test]
fn write_image_installs_binary_config_unit_and_hostname() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let img = make_image(d);
    let binary = d.join("rivulet");
    std::fs::write(&binary, b"\x7fELF pretend binary").unwrap();
    let out = run(Command::new("bash")
        .arg(root().join("deploy/pi/write-image.sh"))
        .arg(&img)
        .args(["--hostname", "pi-07", "--config"])
        .arg(root().join("configs/demo.yaml"))
        .arg("--binary")
        .arg(&binary)
        .arg("--ssh"));
    assert!(out.contains("installed for pi-07"), "{out}");
    assert_eq!(root_fs_file(d, &img, "/etc/hostname").trim(), "pi-07");
    let hosts = root_fs_file(d, &img, "/etc/hosts");
    assert!(
        hosts.contains("127.0.1.1\tpi-07")
            && !hosts.contains("raspberrypi")
            && hosts.contains("localhost"),
        "{hosts}"
    );
    assert_eq!(
        root_fs_file(d, &img, "/usr/local/bin/rivulet").as_bytes(),
        b"\x7fELF pretend binary"
    );
    assert_eq!(
        root_fs_file(d, &img, "/etc/rivulet/pipeline.yaml"),
        std::fs::read_to_string(root().join("configs/demo.yaml")).unwrap()
    );
    assert!(
        root_fs_file(d, &img, "/etc/systemd/system/rivulet.service").contains("DynamicUser=yes")
    );
    // Enabled: the wants/ link points at the unit.
    let check = d.join("check.ext4");
    let stat = run(Command::new("debugfs")
        .arg("-R")
        .arg("stat /etc/systemd/system/multi-user.target.wants/rivulet.service")
        .arg(&check));
    assert!(
        stat.contains("Fast link dest: \"/etc/systemd/system/rivulet.service\""),
        "{stat}"
    );
    let mode = run(Command::new("debugfs")
        .arg("-R")
        .arg("stat /usr/local/bin/rivulet")
        .arg(&check));
    assert!(mode.contains("Mode:  0755"), "{mode}");
    // SSH enabled on the boot partition.
    let listing = run(Command::new("mdir")
        .env("MTOOLS_SKIP_CHECK", "1")
        .arg("-i")
        .arg(format!("{}@@{}", img.display(), 2048 * 512)));
    assert!(listing.to_lowercase().contains("ssh"), "{listing}");
    // Running it again (a re-flash with a new config) replaces the files.
    std::fs::write(d.join("other.yaml"), "name: other\n").unwrap();
    run(Command::new("bash")
        .arg(root().join("deploy/pi/write-image.sh"))
        .arg(&img)
        .args(["--hostname", "pi-08", "--config"])
        .arg(d.join("other.yaml"))
        .arg("--binary")
        .arg(&binary));
    assert_eq!(root_fs_file(d, &img, "/etc/hostname").trim(), "pi-08");
    assert_eq!(
        root_fs_file(d, &img, "/etc/rivulet/pipeline.yaml"),
        "name: other\n"
    );
}

#[test]
fn write_image_rejects_bad_host_names() {
    let dir = tempfile::tempdir().unwrap();
    let img = make_image(dir.path());
    let out = Command::new("bash")
        .arg(root().join("deploy/pi/write-image.sh"))
        .arg(&img)
        .args(["--hostname", "bad_name!", "--config"])
        .arg(root().join("configs/demo.yaml"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("bad host name"));
}

#[test]
fn install_copies_and_starts_on_every_host() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let log = d.join("calls.log");
    // ssh and scp that record what they were asked to do.
    for tool in ["ssh", "scp"] {
        let p = d.join(tool);
        std::fs::write(
            &p,
            format!("#!/bin/sh\necho \"{tool} $*\" >> {}\n", log.display()),
        )
        .unwrap();
        run(Command::new("chmod").arg("+x").arg(&p));
    }
    let binary = d.join("rivulet");
    std::fs::write(&binary, "bin").unwrap();
    let out = run(Command::new("bash")
        .arg(root().join("deploy/pi/install.sh"))
        .arg("-c")
        .arg(root().join("configs/demo.yaml"))
        .arg("-b")
        .arg(&binary)
        .args(["-u", "ops", "pi-01", "pi-02"])
        .env("SSH", d.join("ssh"))
        .env("SCP", d.join("scp")));
    assert!(out.contains("== pi-01") && out.contains("== pi-02"));
    let calls = std::fs::read_to_string(&log).unwrap();
    for host in ["pi-01", "pi-02"] {
        assert!(calls.contains(&format!("ops@{host}:/tmp/")), "{calls}");
        let ssh = calls
            .lines()
            .find(|l| l.starts_with(&format!("ssh ops@{host}")))
            .unwrap();
        for step in [
            "install -D -m 0755 /tmp/rivulet /usr/local/bin/rivulet",
            "/etc/rivulet/pipeline.yaml",
            "systemctl enable rivulet.service",
            "systemctl restart rivulet.service",
        ] {
            assert!(
                calls.contains(step),
                "{host}: {step} missing in {ssh}\n{calls}"
            );
        }
    }
}
