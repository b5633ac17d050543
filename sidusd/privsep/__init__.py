"""Privilege separation: a root supervisor and an unprivileged network worker.

* :mod:`.supervisor` (root, the process systemd starts): loads and validates
  the config, binds every privileged socket (:mod:`sidusd.net.listeners`:
  DHCP 67/4011 with ``SO_BINDTODEVICE``, TFTP 69, the HTTP listener), owns the
  control socket, the NFS / iSCSI managers and every state write (inventory,
  leases, secrets), and runs one worker; :mod:`.lifecycle` spawns it and
  restarts it with a bounded backoff when it dies, :mod:`.broker` answers its
  requests (open, lease.load, lease.append), :mod:`.channel` reads its
  datagrams (hostile) and :mod:`.reports` applies what it reports.
* :mod:`.worker` (``python -m sidusd.privsep.worker``): drops to
  ``security.worker_user`` (no capabilities, empty bounding set,
  ``PR_SET_NO_NEW_PRIVS``, no supplementary groups) before it reads a single
  byte from the network, then runs the unchanged DHCP / TFTP / HTTP services
  on the ServiceIO of :mod:`.rpc` (inherited sockets, files and leases asked
  of the supervisor, asynchronously) and the runtime of :mod:`.forwarding`.
* :mod:`.ipc`: the two socketpairs between them.  What the worker sends is
  hostile to the supervisor: strict JSON, one message per datagram, size
  capped, every field checked; never pickle from the worker.
* :mod:`.creds`: users, capabilities (read from ``/proc``), the drop itself.
"""
