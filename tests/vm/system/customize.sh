#!/bin/sh
# mmdebstrap customize hook of build-image.sh: what makes the root a bootable
# test guest. $1 is the root directory. Nothing here configures switch-agent,
# iSCSI or multipath: the scenario does that in the guest, as an admin would.
set -eu
R=$1

echo swguest > "$R/etc/hostname"
printf '127.0.0.1\tlocalhost\n127.0.1.1\tswguest\n' > "$R/etc/hosts"

# vda: this root; vdb: the emulated array's backing store (survives reboots);
# the host's share (9p, tag swtest): the test's script in, its results out.
cat > "$R/etc/fstab" <<'FSTAB'
/dev/vda  /               ext4  rw,errors=remount-ro                       0 1
/dev/vdb  /var/lib/swemu  ext4  rw,nofail,x-systemd.device-timeout=10s     0 2
swtest    /mnt/swtest     9p    trans=virtio,version=9p2000.L,msize=262144,nofail  0 0
FSTAB
mkdir -p "$R/var/lib/swemu" "$R/mnt/swtest"
# The share's transport before local-fs.target mounts it (udev would load it too, maybe later).
printf '9pnet_virtio\n9p\n' > "$R/etc/modules-load.d/swtest.conf"

# The journal on disk: the scenario reads the first boot's messages after the reboot.
mkdir -p "$R/var/log/journal"

# Root logs in on the serial console without a password (a throw-away test VM).
chroot "$R" passwd -d root >/dev/null

# The runner: a plain service (not oneshot), so that the boot finishes while
# it runs and the script can wait for `systemctl is-system-running`.
cat > "$R/etc/systemd/system/swtest-runner.service" <<'UNIT'
[Unit]
Description=switch-agent VM test: run the host's /mnt/swtest/boot.sh
After=multi-user.target
RequiresMountsFor=/mnt/swtest
ConditionPathExists=/mnt/swtest/boot.sh

[Service]
Type=exec
ExecStart=/bin/sh /mnt/swtest/boot.sh
StandardOutput=journal+console
StandardError=journal+console

[Install]
WantedBy=multi-user.target
UNIT
mkdir -p "$R/etc/systemd/system/multi-user.target.wants"
ln -sf /etc/systemd/system/swtest-runner.service "$R/etc/systemd/system/multi-user.target.wants/swtest-runner.service"

# Timers that would wake up during a test and compete for two TCG CPUs.
# rtslib-fb-targetctl restores (and at shutdown clears) a saved LIO setup: the emulator owns LIO.
for unit in apt-daily.timer apt-daily-upgrade.timer e2scrub_all.timer fstrim.timer dpkg-db-backup.timer \
            rtslib-fb-targetctl.service; do
    ln -sf /dev/null "$R/etc/systemd/system/$unit"
done
