# frozen_string_literal: true

# A "restore" (or "reset to the nightly dump") button for a Rack or Rails app, driving the
# pgops.dbrestore web trigger (pgops-restore start/status, through sudo):
#
#   require "/etc/app/pgops_restore_button.rb"
#   use PgopsRestore::Button, db: "hoge_db",
#       allow: ->(env) { env["warden"]&.user&.admin? }  # who may press it (the app decides)
#
#   POST <path>            starts a restore of db, answers 303 to <path>/progress
#   GET  <path>/progress   a page that shows the progress and reloads itself every `poll`
#                          seconds; once the restore is done it redirects (303) to `return_to`
#   GET  <path>/status     pgops-restore's status JSON, as is
#
# Put it before anything that needs the database (the session store, authentication), so its
# progress page and status keep answering while the database is switched; `allow` is asked only
# for the POST that starts a restore. With the restore's keep_tables naming the session table,
# the user is still signed in when the page redirects. The page needs no JavaScript.
require "json"
require "open3"
require "rack"
require "erb"

module PgopsRestore
  SUDO = ["sudo", "-n", "-u", "postgres", "/usr/local/sbin/pgops-restore"].freeze

  class Button
    # db: the database (one of the web trigger's restore_web_trigger_dbs); command: how to run
    # pgops-restore (an argv prefix, never a shell line); path: where the button lives;
    # return_to: where the page sends the browser when done; poll: seconds between reloads.
    def initialize(app, db:, allow:, command: SUDO, path: "/pgops/restore", return_to: "/", poll: 1)
      @app = app
      @db = db
      @allow = allow
      @command = command.dup.freeze
      @path = path.chomp("/")
      @return_to = return_to
      @poll = poll
    end

    def call(env)
      req = Rack::Request.new(env)
      case [req.request_method, req.path_info]
      when ["POST", @path] then start(req, env)
      when ["GET", "#{@path}/progress"], ["HEAD", "#{@path}/progress"] then progress
      when ["GET", "#{@path}/status"], ["HEAD", "#{@path}/status"] then json(200, run("status"))
      else @app.call(env)
      end
    end

    private

    def start(req, env)
      return text(403, "not allowed\n") unless @allow.call(env)
      return text(403, "cross-site request refused\n") unless same_origin?(req)

      answer = run("start")
      # started, or another restore of db already runs: either way the progress page follows it
      return redirect("#{@path}/progress") if answer["ok"] || answer["exit_code"] == 4

      page(502, "Restore not started", "<p>#{h(answer['error'])}</p>")
    end

    def progress
      status = run("status")
      case status["state"]
      when "done", "none" then redirect(@return_to)
      when "failed"
        page(500, "Restore failed", "<p>#{h(status['error'])}</p><p>The data is as it was before.</p>")
      when nil
        page(502, "Restore status unknown", "<p>#{h(status['error'])}</p>", refresh: true)
      else
        # no progress before the restore holds the database's lock (another restore of it may run)
        line = status.dig("progress", "line") || "#{@db}: starting"
        page(200, "Restoring #{@db}", "<p id=\"state\">#{h(status['state'])}</p><p id=\"line\">#{h(line)}</p>",
             refresh: true)
      end
    end

    # pgops-restore's one JSON line, with its exit code; any failure to run it is an answer too.
    def run(verb)
      out, status = Open3.capture2(*@command, verb, @db, stdin_data: "")
      answer = JSON.parse(out.lines.last.to_s)
      answer = { "ok" => false, "error" => "pgops-restore answered #{out.inspect}" } unless answer.is_a?(Hash)
      answer.merge("exit_code" => status.exitstatus)
    rescue JSON::ParserError, SystemCallError => e
      { "ok" => false, "error" => "cannot run pgops-restore #{verb}: #{e.message}", "exit_code" => nil }
    end

    def same_origin?(req)
      origin = req.get_header("HTTP_ORIGIN")
      origin.nil? || origin == req.base_url # a form of this site, or a client that sends no Origin
    end

    def redirect(location)
      [303, { "location" => location, "content-type" => "text/plain", "cache-control" => "no-store" }, ["\n"]]
    end

    def json(code, body)
      [code, { "content-type" => "application/json", "cache-control" => "no-store" }, [JSON.generate(body) + "\n"]]
    end

    def text(code, body)
      [code, { "content-type" => "text/plain" }, [body]]
    end

    def page(code, title, body, refresh: false)
      meta = refresh ? %(<meta http-equiv="refresh" content="#{@poll}">) : ""
      html = <<~HTML
        <!DOCTYPE html>
        <html><head><meta charset="utf-8">#{meta}<title>#{h(title)}</title></head>
        <body><h1>#{h(title)}</h1>#{body}</body></html>
      HTML
      [code, { "content-type" => "text/html; charset=utf-8", "cache-control" => "no-store" }, [html]]
    end

    def h(text)
      ERB::Util.html_escape(text.to_s)
    end
  end
end
