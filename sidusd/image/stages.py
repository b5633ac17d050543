"""The stage plan of an image build, and the files the stages write (pure, no I/O).

:func:`plan` turns a :class:`~sidusd.image.recipe.Recipe` into an ordered list
of :class:`Stage`: each has a fixed name (used in progress lines, log events
``image.stage.*`` and failure messages), says whether it runs inside the chroot
(then /proc, /sys, /dev/pts, /dev/shm are mounted and policy-rc.d is in place),
and carries the argv lists it runs and the files it writes.  Every stage is
idempotent: running it twice gives the same root (files are rewritten whole,
apt installs what is missing, purge skips what is gone).

The executor (:mod:`sidusd.image.build`) runs the plan; this module only decides.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:                        # annotations only: chroot.py imports the constants below
    from sidusd.image.recipe import Recipe

POLICY_RC_D = b"#!/bin/sh\n# sidus: no service starts inside an image being administered\nexit 101\n"
APT_ENV = {"DEBIAN_FRONTEND": "noninteractive", "DEBCONF_NONINTERACTIVE_SEEN": "true", "LC_ALL": "C",
           "PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root"}
APT_OPTS = ("-y", "-q", "-o", "Dpkg::Options::=--force-confdef", "-o", "Dpkg::Options::=--force-confold")
UPGRADE_COMMANDS = (("apt-get", "-q", "update"), ("apt-get", *APT_OPTS, "full-upgrade"))
# -c for a kernel without an initrd, -u otherwise: the stage can run again
INITRAMFS_SCRIPT = ('set -e; for d in /lib/modules/*; do [ -d "$d" ] || continue; k="${d##*/}"; '
                    'if [ -e "/boot/initrd.img-$k" ]; then update-initramfs -u -k "$k"; '
                    'else update-initramfs -c -k "$k"; fi; done')
SSH_KEYGEN_UNIT = b"""[Unit]
Description=sidus: generate this machine's ssh host keys (the image carries none)
Before=ssh.service
ConditionPathExistsGlob=!/etc/ssh/ssh_host_*_key

[Service]
Type=oneshot
ExecStart=/usr/bin/ssh-keygen -A

[Install]
WantedBy=multi-user.target
"""

# The image has no /etc/hostname: at boot this names the machine from sidusd's per-host
# `sidus.hostname=` kernel argument, else from the host name the initramfs got by DHCP
# (/run/net-<dev>.conf, written by ipconfig), before sysinit.target (docs/images.md).
# The SIDUS_HOSTNAME_* variables exist for the tests only (systemd runs it with none set).
HOSTNAME_SCRIPT = br"""#!/bin/sh
# sidus: this machine's host name (the shared image has none).  docs/images.md
cmdline=${SIDUS_HOSTNAME_CMDLINE:-/proc/cmdline}
etc=${SIDUS_HOSTNAME_ETC:-/etc}
run=${SIDUS_HOSTNAME_RUN:-/run}
kernel=${SIDUS_HOSTNAME_KERNEL:-/proc/sys/kernel/hostname}
name=""
from="sidus.hostname"
for a in $(cat "$cmdline"); do
  case "$a" in sidus.hostname=*) name="${a#sidus.hostname=}" ;; esac
done
if [ -z "$name" ]; then
  from="DHCP"
  for f in "$run"/net-*.conf; do
    [ -r "$f" ] || continue
    name=$(sed -n "s/^HOSTNAME=['\"]\{0,1\}\([^'\"]*\)['\"]\{0,1\}\$/\1/p" "$f" | head -n 1)
    [ -n "$name" ] && break
  done
fi
case "$name" in
  ""|*[!A-Za-z0-9.-]*|-*|.*|*.)
    echo "sidus-hostname: no usable host name from sidus.hostname= or DHCP; keeping $(cat "$kernel")"
    exit 0 ;;
esac
if [ ${#name} -gt 64 ]; then
  echo "sidus-hostname: $name is longer than 64 characters; keeping $(cat "$kernel")"
  exit 0
fi
short=${name%%.*}
printf '%s\n' "$name" > "$kernel" || echo "sidus-hostname: cannot set the kernel host name"
if printf '%s\n' "$name" > "$etc/.hostname.sidus-tmp"; then
  mv -f "$etc/.hostname.sidus-tmp" "$etc/hostname"
else
  echo "sidus-hostname: cannot write $etc/hostname"
fi
if [ -w "$etc/hosts" ]; then
  sed -i '/^127\.0\.1\.1[[:space:]]/d' "$etc/hosts"
  if [ "$short" = "$name" ]; then
    printf '127.0.1.1\t%s\n' "$name" >> "$etc/hosts"
  else
    printf '127.0.1.1\t%s %s\n' "$name" "$short" >> "$etc/hosts"
  fi
fi
echo "sidus-hostname: $name (from $from)"
"""
HOSTNAME_UNIT = b"""[Unit]
Description=sidus: this machine's host name from sidus.hostname= or DHCP (the image has none)
DefaultDependencies=no
After=systemd-remount-fs.service
Before=sysinit.target systemd-hostnamed.service network-pre.target
Wants=network-pre.target

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/usr/lib/sidus/sidus-hostname
StandardOutput=journal+console

[Install]
WantedBy=sysinit.target
"""
HOSTNAME_UNIT_PATH = "etc/systemd/system/sidus-hostname.service"


@dataclass(frozen=True)
class Stage:
    """One named build step.  ``commands`` run in order (inside the chroot when ``chroot``);
    ``files`` (path inside the root -> (bytes, mode)) are written before the commands;
    ``remove`` (paths inside the root, globs allowed) are deleted after them."""
    name: str
    summary: str
    chroot: bool = False
    commands: tuple[tuple[str, ...], ...] = ()
    files: tuple[tuple[str, bytes, int], ...] = ()
    remove: tuple[str, ...] = ()
    timeout_s: float = 600


ROLLING_SUITES = ("sid", "unstable", "experimental")


def has_security_archive(suite: str) -> bool:
    """Suites with ``-updates`` and ``-security`` archives (not sid/unstable/experimental)."""
    return suite not in ROLLING_SUITES


def sources_list(recipe: Recipe, mirror: str, security: str | None = None) -> bytes:
    """/etc/apt/sources.list of the image: the mirror's suite and ``suite-updates``, and the
    security archive ``security`` with ``suite-security`` (stable suites only; None: none)."""
    comps = " ".join(recipe.components)
    lines = ["# sidus: from the image recipe (docs/images.md)", f"deb {mirror} {recipe.suite} {comps}"]
    if has_security_archive(recipe.suite):
        lines.append(f"deb {mirror} {recipe.suite}-updates {comps}")
        if security:
            lines.append(f"deb {security} {recipe.suite}-security {comps}")
    return ("\n".join(lines) + "\n").encode()


def resolv_conf(recipe: Recipe) -> bytes:
    """A static resolv.conf(5): the recipe's name servers and search list."""
    out = ["# sidus: static resolv.conf from the image recipe"]
    if recipe.search:
        out.append("search " + " ".join(recipe.search))
    out += [f"nameserver {n}" for n in recipe.nameservers]
    return ("\n".join(out) + "\n").encode()


INTERFACES = (b"# sidus: loopback only; the network boot configured the interface (ip=dhcp)\n"
              b"source /etc/network/interfaces.d/*\n\nauto lo\niface lo inet loopback\n")
HOSTS = b"127.0.0.1\tlocalhost\n::1\t\tlocalhost ip6-localhost ip6-loopback\n"


def limits_conf(recipe: Recipe) -> bytes:
    """/etc/security/limits.d/sidus.conf lines (limits.conf(5))."""
    return ("# sidus: from the image recipe\n" + "".join(l.line() + "\n" for l in recipe.limits)).encode()


def keyboard_file(recipe: Recipe) -> bytes:
    """/etc/default/keyboard (keyboard(5))."""
    k = recipe.keyboard
    assert k is not None
    return (f'XKBMODEL="{k.model}"\nXKBLAYOUT="{k.layout}"\nXKBVARIANT="{k.variant}"\n'
            f'XKBOPTIONS="{k.options}"\nBACKSPACE="guess"\n').encode()


def _needs_locales(recipe: Recipe) -> bool:
    return recipe.locale not in ("C", "POSIX", "C.UTF-8")


def packages_to_install(recipe: Recipe) -> tuple[str, ...]:
    """The recipe's packages plus what the stages need (locales, tzdata, keyboard-configuration)."""
    extra = []
    if _needs_locales(recipe):
        extra.append("locales")
    if recipe.timezone != "Etc/UTC":
        extra.append("tzdata")
    if recipe.keyboard is not None:
        extra.append("keyboard-configuration")
    if recipe.has_kernel:
        # busybox: the overlay script's `mount -o remount,ro DIR` fails with klibc's mount
        extra += ["initramfs-tools", "busybox"]
    return tuple(dict.fromkeys(recipe.packages + tuple(e for e in extra if e not in recipe.purge)))


def debootstrap_argv(recipe: Recipe, root: str, mirror: str, cache_dir: str | None) -> tuple[str, ...]:
    """The debootstrap(8) command line."""
    argv = ["debootstrap", f"--variant={recipe.variant}", f"--arch={recipe.architecture}",
            f"--components={','.join(recipe.components)}"]
    if recipe.include:
        argv.append("--include=" + ",".join(recipe.include))
    if recipe.exclude:
        argv.append("--exclude=" + ",".join(recipe.exclude))
    if cache_dir:
        argv.append(f"--cache-dir={cache_dir}")
    return tuple(argv + [recipe.suite, root, mirror])


def plan(recipe: Recipe, *, mirror: str, initramfs: dict[str, bytes], security: str | None = None) -> list[Stage]:
    """The ordered stages of a build on top of a bootstrapped root.

    ``initramfs`` maps a path under /etc/initramfs-tools (``hooks/sidus-overlay``,
    ``scripts/init-bottom/sidus-overlay``, ``modules``) to its content (from
    sidusd/data/initramfs/).  ``security``: the security archive's URI (None: none).
    Debootstrap itself is not a Stage here: it runs outside any chroot before
    the plan (see :func:`debootstrap_argv`).
    """
    stages: list[Stage] = [
        Stage("apt-sources", "apt sources: the mirror, -updates" + (", -security" if security and
                                                                    has_security_archive(recipe.suite) else ""),
              files=(("etc/apt/sources.list", sources_list(recipe, mirror, security), 0o644),)),
    ]
    # debootstrap installs the suite's versions only: the whole root is brought up to date from
    # -updates and -security before anything else is installed (a fresh image has no pending upgrade)
    stages.append(Stage("upgrade", "apt-get update + full-upgrade (the security archive's fixes)", chroot=True,
                        commands=UPGRADE_COMMANDS, timeout_s=3600))
    pkgs = packages_to_install(recipe)
    install = ["apt-get", *APT_OPTS, "install"]
    install.append("--install-recommends" if recipe.install_recommends else "--no-install-recommends")
    if recipe.install_suggests:
        install += ["-o", "APT::Install-Suggests=true"]
    cmds: list[tuple[str, ...]] = [("apt-get", "-q", "update")]
    if pkgs:
        cmds.append(tuple(install + list(pkgs)))
    stages.append(Stage("packages", f"install {len(pkgs)} package(s)", chroot=True, commands=tuple(cmds),
                        timeout_s=3600))
    if recipe.purge:
        # dpkg-query filters out what is not installed, so the stage can run again
        script = ('set -e; p=""; for x in "$@"; do dpkg-query -W -f=\'${Status}\' "$x" 2>/dev/null '
                  '| grep -q "install ok installed" && p="$p $x"; done; '
                  '[ -z "$p" ] || apt-get -y -q purge --auto-remove $p')
        stages.append(Stage("purge", f"purge {len(recipe.purge)} package(s)", chroot=True,
                            commands=(("sh", "-c", script, "sidus-purge", *recipe.purge),), timeout_s=1800))
    loc_files = [("etc/default/locale", f"LANG={recipe.locale}\n".encode(), 0o644)]
    loc_cmds: tuple[tuple[str, ...], ...] = ()
    if _needs_locales(recipe):
        charset = "UTF-8" if recipe.locale.endswith(".UTF-8") else "ISO-8859-1"
        loc_files.append(("etc/locale.gen", f"{recipe.locale} {charset}\n".encode(), 0o644))
        loc_cmds = (("locale-gen",),)
    stages.append(Stage("locale", f"locale {recipe.locale}", chroot=True, files=tuple(loc_files),
                        commands=loc_cmds))
    stages.append(Stage("timezone", f"timezone {recipe.timezone}", chroot=True,
                        files=(("etc/timezone", f"{recipe.timezone}\n".encode(), 0o644),),
                        commands=(("ln", "-sfn", f"/usr/share/zoneinfo/{recipe.timezone}", "/etc/localtime"),)))
    if recipe.keyboard is not None:
        stages.append(Stage("keyboard", f"keyboard {recipe.keyboard.layout}",
                            files=(("etc/default/keyboard", keyboard_file(recipe), 0o644),)))
    stages.append(Stage("network", "no hostname (sidus.hostname= or DHCP names the machine at boot), "
                        "static resolv.conf, loopback", chroot=True,
                        files=(("etc/resolv.conf", resolv_conf(recipe), 0o644),
                               ("etc/network/interfaces", INTERFACES, 0o644),
                               ("etc/hosts", HOSTS, 0o644),
                               ("usr/lib/sidus/sidus-hostname", HOSTNAME_SCRIPT, 0o755),
                               (HOSTNAME_UNIT_PATH, HOSTNAME_UNIT, 0o644)),
                        commands=(("mkdir", "-p", "/etc/systemd/system/sysinit.target.wants"),
                                  ("ln", "-sfn", f"/{HOSTNAME_UNIT_PATH}",
                                   "/etc/systemd/system/sysinit.target.wants/sidus-hostname.service")),
                        remove=("etc/hostname",)))
    if recipe.limits:
        stages.append(Stage("limits", f"{len(recipe.limits)} limits.conf line(s)",
                            files=(("etc/security/limits.d/sidus.conf", limits_conf(recipe), 0o644),)))
    if recipe.site_files is not None:
        stages.append(Stage("site-files", f"copy {recipe.site_files} into the root"))
    if recipe.enable_units:
        stages.append(Stage("units", f"enable {', '.join(recipe.enable_units)}", chroot=True,
                            commands=(("systemctl", "enable", *recipe.enable_units),)))
    stages.append(Stage("secrets", "no ssh host keys (made at first boot), root password per recipe",
                        chroot=True,
                        files=(("etc/systemd/system/sidus-ssh-keygen.service", SSH_KEYGEN_UNIT, 0o644),),
                        commands=(("usermod", "-p", recipe.root_password_hash or "*", "root"),),
                        remove=("etc/ssh/ssh_host_*",)))
    stages.append(Stage("machine-id", "empty machine-id (systemd makes one per boot)",
                        files=(("etc/machine-id", b"", 0o444),), remove=("var/lib/dbus/machine-id",)))
    if recipe.has_kernel:
        files = tuple((f"etc/initramfs-tools/{rel}", data, 0o755 if rel != "modules" else 0o644)
                      for rel, data in sorted(initramfs.items()))
        stages.append(Stage("initramfs", "overlay hook + modules, BOOT=nfs, BUSYBOX=y, update-initramfs inside",
                            chroot=True, files=files,
                            commands=(("sed", "-i", "-e", "s/^BOOT=.*/BOOT=nfs/", "-e", "s/^BUSYBOX=.*/BUSYBOX=y/",
                                       "/etc/initramfs-tools/initramfs.conf"),
                                      ("sh", "-c", INITRAMFS_SCRIPT)),
                            remove=("boot/initrd.img-*.old-dkms",), timeout_s=1800))
    stages.append(Stage("clean", "apt-get clean", chroot=True, commands=(("apt-get", "clean"),)))
    return stages


def update_plan() -> list[Stage]:
    """The stages of ``image update``: apt update, full-upgrade, autoremove, clean, initramfs refresh."""
    return [Stage("upgrade", "apt-get update + full-upgrade", chroot=True, timeout_s=3600,
                  commands=(*UPGRADE_COMMANDS, ("apt-get", *APT_OPTS, "autoremove", "--purge"))),
            Stage("initramfs", "update-initramfs inside", chroot=True, timeout_s=1800,
                  commands=(("sh", "-c", INITRAMFS_SCRIPT),)),
            Stage("secrets", "no ssh host keys", remove=("etc/ssh/ssh_host_*",)),
            Stage("clean", "apt-get clean", chroot=True, commands=(("apt-get", "clean"),))]
