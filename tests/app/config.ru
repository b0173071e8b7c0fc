# Test app for the pgops.dbrestore.web_host role: Rack + ActiveRecord, no Rails.
# Every request reads hoge_db and answers one line:
#   ok pid=<worker> ppid=<master> oid=<oid of the database> probe=<t|f> rows=<n>
# oid changes when a restore swaps in a new copy; probe is t while a table named pgops_probe
# exists (the tests create it in the live copy, a restored copy has none); rows counts the
# rows of APP_TABLE.
# With PGOPS_DB_LIB set (the role's unit does that when its hooks are on) the reconnect
# middleware wraps the app; without it this is a plain app that keeps its connection.
require "active_record"

ActiveRecord::Base.establish_connection(ENV.fetch("DATABASE_URL"))
ActiveRecord::Base.logger = nil

QUERY = <<~SQL.freeze
  SELECT (SELECT oid FROM pg_database WHERE datname = current_database()) AS oid,
         to_regclass('public.pgops_probe') IS NOT NULL AS probe,
         (SELECT count(*) FROM #{ENV.fetch('APP_TABLE', 'pg_catalog.pg_class')}) AS rows
SQL

app = lambda do |_env|
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

use ShowErrors
if (lib = ENV["PGOPS_DB_LIB"]) && !lib.empty?
  require lib
  use PgopsDb::Reconnect
end
run app
