# Test app for the pgops.dbrestore.web_host role: Rack + ActiveRecord, no Rails.
# Every request reads hoge_db and answers one line:
#   ok pid=<worker> ppid=<master> oid=<oid of the database> probe=<t|f> rows=<n>
# oid changes when a restore swaps in a new copy; probe is t while a table named pgops_probe
# exists (the tests create it in the live copy, a restored copy has none); rows counts the
# rows of APP_TABLE.
# With PGOPS_DB_LIB set (the role's unit does that when its hooks are on) the reconnect
# middleware wraps the app; without it this is a plain app that keeps its connection.
# Login sessions live in the database, as the ActiveRecord session store keeps them (a table
# "sessions" the molecule test creates): POST /login user=<name> signs in (cookie sid), GET
# /whoami answers "user=<name or ->". With PGOPS_BUTTON_LIB set, the restore button (the role's
# pgops_restore_button.rb) is at /pgops/restore for the user "admin", running the command in
# PGOPS_RESTORE_COMMAND (a JSON list). Every response carries the header x-app-pid: the pid of
# the worker process that answered it (the tests kill the worker that started a restore).
require "active_record"
require "json"
require "securerandom"

ActiveRecord::Base.establish_connection(ENV.fetch("DATABASE_URL"))
ActiveRecord::Base.logger = nil

QUERY = <<~SQL.freeze
  SELECT (SELECT oid FROM pg_database WHERE datname = current_database()) AS oid,
         to_regclass('public.pgops_probe') IS NOT NULL AS probe,
         (SELECT count(*) FROM #{ENV.fetch('APP_TABLE', 'pg_catalog.pg_class')}) AS rows
SQL

def session_user(env)
  sid = Rack::Request.new(env).cookies["sid"]
  return nil unless sid

  conn = ActiveRecord::Base.connection
  conn.select_value("SELECT data FROM sessions WHERE session_id = #{conn.quote(sid)}")
end

def sign_in(env)
  sid = SecureRandom.hex(16)
  conn = ActiveRecord::Base.connection
  user = Rack::Request.new(env).params["user"].to_s
  conn.execute("INSERT INTO sessions (session_id, data) VALUES (#{conn.quote(sid)}, #{conn.quote(user)})")
  [303, { "location" => "/whoami", "set-cookie" => "sid=#{sid}; Path=/; HttpOnly" }, []]
end

app = lambda do |env|
  return sign_in(env) if env["REQUEST_METHOD"] == "POST" && env["PATH_INFO"] == "/login"
  if env["PATH_INFO"] == "/whoami"
    return [200, { "content-type" => "text/plain" }, ["user=#{session_user(env) || '-'}\n"]]
  end

  row = ActiveRecord::Base.connection.select_one(QUERY)
  body = format("ok pid=%<pid>d ppid=%<ppid>d oid=%<oid>s probe=%<probe>s rows=%<rows>s\n",
                pid: Process.pid, ppid: Process.ppid, oid: row["oid"], probe: row["probe"] ? "t" : "f", rows: row["rows"])
  [200, { "content-type" => "text/plain" }, [body]]
end

# What a framework's exception page does: any error becomes a 500 with one line.
class ShowErrors
  def initialize(app)
    @app = app
  end

  def call(env)
    @app.call(env)
  rescue StandardError => e
    [500, { "content-type" => "text/plain" },
     ["error pid=#{Process.pid} #{e.class}: #{e.message.lines.first&.strip}\n"]]
  end
end

# Outermost: every answer, the restore button's too, names the worker process that gave it.
class ReportPid
  def initialize(app)
    @app = app
  end

  def call(env)
    status, headers, body = @app.call(env)
    [status, headers.merge("x-app-pid" => Process.pid.to_s), body]
  end
end

use ReportPid
use ShowErrors
if (lib = ENV["PGOPS_DB_LIB"]) && !lib.empty?
  require lib
  use PgopsDb::Reconnect
end
if (button = ENV["PGOPS_BUTTON_LIB"]) && !button.empty?
  require button
  use PgopsRestore::Button, db: "hoge_db", return_to: "/whoami",
                            command: JSON.parse(ENV.fetch("PGOPS_RESTORE_COMMAND", JSON.generate(PgopsRestore::SUDO))),
                            allow: ->(env) { session_user(env) == "admin" }
end
run app
