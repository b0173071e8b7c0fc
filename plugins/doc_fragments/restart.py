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
        O(restart_data_dir) or O(restart_command). Every session of the server ends, not only those of the database.
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
"""
