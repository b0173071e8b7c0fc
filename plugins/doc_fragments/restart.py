# Copyright: pgops.dbrestore contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The restart fallback options, shared by every module that ends sessions."""

from __future__ import annotations


class ModuleDocFragment:
    DOCUMENTATION = r"""
options:
  fallback:
    description:
      - V(restart) restarts the server when sessions cannot be terminated (server older than 8.4, or a login role
        that is neither superuser nor member of C(pg_signal_backend)); configure one of O(restart_service),
        O(restart_data_dir) or O(restart_command), or O(restart_patroni_url) for a server managed by Patroni. Every
        session of the server ends, not only those of the database.
      - A server managed by Patroni is never restarted with C(systemctl) or C(pg_ctl) behind Patroni's back (which
        can trigger a failover); when Patroni's REST API answers on this host (C(http://127.0.0.1:8008)) or
        O(restart_data_dir) holds C(patroni.dynamic.json), a restart command is refused (before anything is staged,
        in check mode too) and O(restart_patroni_url) must be set.
    type: str
    choices: [ none, restart ]
    default: none
  restart_service:
    description:
      - Service to restart (C(systemctl restart NAME), or C(service NAME restart) without systemd).
    type: str
  restart_data_dir:
    description:
      - Data directory for C(pg_ctl restart -m fast -w).
    type: path
  restart_pg_ctl:
    description:
      - Path of C(pg_ctl) used with O(restart_data_dir).
    type: path
    default: pg_ctl
  restart_command:
    description:
      - Explicit argv of the restart command, for example C([/etc/init.d/postgresql, restart]).
        Never run through a shell.
    type: list
    elements: str
    default: []
  restart_become_user:
    description:
      - Run the restart command as this user, with C(sudo -n -u USER) (C(runuser) when the module runs as root).
        The sudoers rule must allow the exact command without a tty (see the pgops.dbrestore.sudo role).
    type: str
  restart_sudo:
    description:
      - Run the restart command through C(sudo -n) as root (when O(restart_become_user) is not set).
    type: bool
    default: false
  restart_timeout:
    description:
      - Seconds the restart may take.
    type: int
    default: 120
  restart_patroni_url:
    description:
      - Patroni's REST API of the member running this server, for example C(http://127.0.0.1:8008). The fallback then
        restarts the server with C(POST /restart) of that member (with O(restart_timeout)), checks that it is running
        again and, if it was the leader, still is; O(restart_service), O(restart_data_dir) and O(restart_command) are
        not used.
    type: str
  restart_patroni_user:
    description:
      - User for the REST API's basic authentication (C(restapi.authentication) of patroni.yml).
    type: str
  restart_patroni_password:
    description:
      - Its password.
    type: str
"""
