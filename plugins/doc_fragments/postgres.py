# Copyright: pgops.dbrestore contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Connection options shared by every module (same names as community.postgresql)."""

from __future__ import annotations


class ModuleDocFragment:
    DOCUMENTATION = r"""
options:
  login_user:
    description:
      - The role to connect as.
    type: str
    default: postgres
    aliases: [ login ]
  login_password:
    description:
      - The password of O(login_user). Prefer a vault variable or C(~/.pgpass).
    type: str
    default: ''
  login_host:
    description:
      - Host name or address of the server. Empty means the local unix socket.
    type: str
    default: ''
    aliases: [ host ]
  login_unix_socket:
    description:
      - Directory of the server's unix socket; wins over O(login_host).
    type: str
    default: ''
    aliases: [ unix_socket ]
  login_port:
    description:
      - Port of the server.
    type: int
    default: 5432
    aliases: [ port ]
  login_db:
    description:
      - Maintenance database the module connects to. Never the database being cleared or restored,
        so the module's own session never holds it open.
    type: str
    default: postgres
    aliases: [ maintenance_db ]
  ssl_mode:
    description:
      - libpq C(sslmode).
    type: str
    default: prefer
    choices: [ allow, disable, prefer, require, verify-ca, verify-full ]
  ca_cert:
    description:
      - CA certificate file (libpq C(sslrootcert)).
    type: str
    aliases: [ ssl_rootcert ]
  ssl_cert:
    description:
      - Client certificate file (libpq C(sslcert)).
    type: path
  ssl_key:
    description:
      - Client key file (libpq C(sslkey)).
    type: path
  connect_timeout:
    description:
      - Seconds to wait for the server to answer a connection attempt.
    type: int
    default: 10
  connect_params:
    description:
      - Any other libpq connection parameters, as a dictionary (for example C(options) or C(target_session_attrs)).
    type: dict
    default: {}
requirements:
  - psycopg >= 3.1 on the host that runs the module
notes:
  - The module connects to O(login_db), never to the target database.
"""
