# frozen_string_literal: true

# Test app for the restore button (roles/web_host/files/pgops_restore_button.rb): plain Rack and
# ruby-pg, a connection per request, login sessions stored in the database like the
# ActiveRecord session store does.
#   POST /login user=<name>   signs in: a row in sessions, its session_id in the "sid" cookie
#   GET  /                    "user=<name or -> items=<rows of items>"
require "json"
require "pg"
require "rack"
require "securerandom"
require ENV.fetch("PGOPS_BUTTON_LIB")

DB_URL = ENV.fetch("DATABASE_URL")

def db
  conn = PG.connect(DB_URL)
  yield conn
ensure
  conn&.close
end

def user_of(env)
  sid = Rack::Request.new(env).cookies["sid"]
  return nil unless sid

  db { |c| c.exec_params("SELECT data FROM sessions WHERE session_id = $1", [sid]).first&.fetch("data") }
end

app = lambda do |env|
  req = Rack::Request.new(env)
  case [req.request_method, req.path_info]
  when ["POST", "/login"]
    sid = SecureRandom.hex(16)
    db { |c| c.exec_params("INSERT INTO sessions (session_id, data) VALUES ($1, $2)", [sid, req.params["user"]]) }
    [303, { "location" => "/", "set-cookie" => "sid=#{sid}; Path=/; HttpOnly" }, []]
  when ["GET", "/"]
    items = db { |c| c.exec("SELECT count(*) FROM items").getvalue(0, 0) }
    [200, { "content-type" => "text/plain" }, ["user=#{user_of(env) || '-'} items=#{items}\n"]]
  else
    [404, { "content-type" => "text/plain" }, ["not found\n"]]
  end
end

use PgopsRestore::Button, db: ENV.fetch("BUTTON_DB"), command: JSON.parse(ENV.fetch("PGOPS_RESTORE_COMMAND")),
                          allow: ->(env) { user_of(env) == "admin" }
run app
