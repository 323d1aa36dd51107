"""Drives the operator console in headless Chromium (Playwright for Python,
the system /usr/bin/chromium) against a running gateway, and prints one JSON
object of observations on stdout for tests/console.rs to assert on.

Environment:
  CONSOLE_BASE      the gateway's origin, e.g. http://127.0.0.1:PORT
  CONSOLE_TOKEN     the operator token to sign in with
  CONSOLE_NEEDLE    a unique --name value for the long run (found in /proc)
  CONSOLE_SHOTS     optional: a directory to write screenshots of the main views to
  CHROMIUM          optional: the browser binary (default /usr/bin/chromium)

A step that fails raises: the script exits non-zero with the traceback on
stderr, and the observations gathered so far on stdout.
"""

import http.server
import json
import os
import pathlib
import sys
import tempfile
import threading

from playwright.sync_api import expect, sync_playwright

BASE = os.environ["CONSOLE_BASE"].rstrip("/")
TOKEN = os.environ["CONSOLE_TOKEN"]
NEEDLE = os.environ["CONSOLE_NEEDLE"]
SHOTS = os.environ.get("CONSOLE_SHOTS")
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
TIMEOUT_MS = 30_000

ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

seen = {}


def shot(page, name):
    if SHOTS:
        pathlib.Path(SHOTS).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=os.path.join(SHOTS, name), full_page=True)


def process_running(needle):
    """Whether a live process has `needle` in its command line."""
    for entry in pathlib.Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue
        if needle.encode() in cmdline:
            return True
    return False


def attacker_server(target):
    """A page on another local origin that tries to run the custom command
    `echo` on the gateway: an auto-submitted form post, and a fetch()."""
    page = f"""<!doctype html><html><body>
<form id="f" method="post" action="{target}/__manage__/echo" enctype="text/plain">
<input name='{{"data": {{' value='}}}}'></form>
<iframe name="sink" id="sink"></iframe>
<script>
window.results = [];
fetch("{target}/__manage__/echo", {{method: "POST", mode: "no-cors", credentials: "include",
  headers: {{"Content-Type": "text/plain"}}, body: '{{"data": {{}}}}'}})
  .then(r => window.results.push("no-cors:" + r.type + ":" + r.status))
  .catch(e => window.results.push("no-cors:error"));
fetch("{target}/__manage__/echo", {{method: "POST", credentials: "include",
  headers: {{"Content-Type": "application/json", "Authorization": "Bearer guessed"}}, body: '{{"data": {{}}}}'}})
  .then(r => window.results.push("cors:" + r.status))
  .catch(e => window.results.push("cors:blocked"));
fetch("{target}/__manage__/jobs", {{credentials: "include"}})
  .then(r => window.results.push("read:" + r.status))
  .catch(e => window.results.push("read:blocked"));
document.getElementById("f").target = "sink";
document.getElementById("f").submit();
</script></body></html>""".encode()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(page)))
            self.end_headers()
            self.wfile.write(page)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def main():
    with tempfile.TemporaryDirectory() as profile, sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            profile,
            executable_path=CHROMIUM,
            headless=True,
            args=ARGS,
            viewport={"width": 1280, "height": 860},
        )
        try:
            drive(context)
        finally:
            context.close()


def drive(context):
    context.set_default_timeout(TIMEOUT_MS)
    expect.set_options(timeout=TIMEOUT_MS)
    page = context.new_page()
    requests = []
    page.on("request", lambda r: requests.append(r.url))
    seen["requests"] = requests

    # The page and its headers.
    resp = page.goto(BASE + "/__manage__/console")
    seen["page_status"] = resp.status
    seen["page_headers"] = resp.all_headers()
    shot(page, "console-signin.png")

    # Sign in: type the token into the labelled field and press Enter.
    field = page.get_by_label("Operator token")
    field.click()
    field.type(TOKEN)
    field.press("Enter")
    expect(page.locator("#operator-name")).to_have_text("alice")
    seen["signed_in_as"] = page.locator("#operator-name").inner_text()
    seen["token_in_session_storage"] = page.evaluate(
        "sessionStorage.getItem('portcullis.operatorToken') !== null"
    )
    seen["cookies"] = context.cookies()
    seen["commands_listed"] = page.locator("#command-list button.command").evaluate_all(
        "bs => bs.map(b => b.dataset.command)"
    )

    # A Django command through its generated form.
    page.locator('#command-list button[data-command="ops_report"]').click()
    form = page.locator("#run-form")
    seen["form_labels"] = form.locator("label").all_inner_texts()
    seen["count_bounds"] = [
        page.get_by_label("count").get_attribute("min"),
        page.get_by_label("count").get_attribute("max"),
    ]
    page.get_by_label("name", exact=True).fill("console-run")
    page.get_by_label("count").fill("2")
    page.get_by_label("loud").check()
    page.get_by_label("Positional arguments").fill("alpha\nbeta")
    page.get_by_role("button", name="Run", exact=True).click()
    status = page.locator("#run-result .job-status")
    expect(status).to_have_text("succeeded")
    seen["run_status"] = status.inner_text()
    seen["run_exit"] = page.locator("#run-result .job-exit").inner_text()
    seen["run_duration"] = page.locator("#run-result .job-duration").inner_text()
    seen["run_output"] = page.locator("#run-result pre.output").inner_text()
    seen["run_job"] = page.locator("#run-result .job-id").inner_text()
    shot(page, "console-commands.png")

    # A long run followed live, then cancelled.
    page.get_by_label("name", exact=True).fill(NEEDLE)
    page.get_by_label("count").fill("")
    page.get_by_label("loud").uncheck()
    page.get_by_label("Positional arguments").fill("")
    page.get_by_label("sleep").fill("60")
    page.get_by_role("button", name="Run", exact=True).click()
    expect(page.locator("#run-result .job-status")).to_have_text("running")
    out = page.locator("#run-result pre.output")
    expect(out).to_contain_text("working 3")
    seen["long_output_live"] = out.inner_text()
    seen["long_alive_before_cancel"] = process_running(NEEDLE)
    seen["long_job"] = page.locator("#run-result .job-id").inner_text()
    shot(page, "console-live.png")
    page.get_by_role("button", name="Cancel", exact=True).click()
    expect(page.locator("#run-result .job-status")).to_have_text("cancelled")
    seen["long_status"] = page.locator("#run-result .job-status").inner_text()
    seen["cancel_button_hidden"] = page.locator("#run-result .job-cancel").is_hidden()

    # A custom command with the keyboard alone: focus it, Enter, Tab to Run, Enter.
    page.locator('#command-list button[data-command="echo"]').focus()
    page.keyboard.press("Enter")
    expect(page.locator("#command-title")).to_have_text("echo")
    page.locator("#run-button").focus()
    page.keyboard.press("Enter")
    expect(page.locator("#run-result .job-status")).to_have_text("succeeded")
    seen["keyboard_output"] = page.locator("#run-result pre.output").inner_text()

    # Jobs: newest first, filters, any job's output.
    page.get_by_role("button", name="Jobs", exact=True).click()
    rows = page.locator("#jobs-table tbody tr")
    expect(rows).to_have_count(3)
    seen["jobs_rows"] = rows.evaluate_all("rs => rs.map(r => r.dataset.job)")
    seen["jobs_statuses"] = page.locator("#jobs-table tbody .status").all_inner_texts()
    shot(page, "console-jobs.png")
    page.get_by_label("Status", exact=True).select_option("cancelled")
    page.get_by_role("button", name="Show jobs", exact=True).click()
    expect(rows).to_have_count(1)
    seen["jobs_filtered_cancelled"] = rows.evaluate_all("rs => rs.map(r => r.dataset.job)")
    page.get_by_label("Status", exact=True).select_option("")
    page.get_by_label("Command", exact=True).fill("ops_report")
    page.get_by_role("button", name="Show jobs", exact=True).click()
    expect(rows).to_have_count(2)
    seen["jobs_filtered_command"] = rows.evaluate_all("rs => rs.map(r => r.dataset.job)")
    page.locator(f'#jobs-table tr[data-job="{seen["run_job"]}"] button').click()
    detail = page.locator("#jobs-detail")
    expect(detail.locator(".job-status")).to_have_text("succeeded")
    expect(detail.locator("pre.output")).to_contain_text("done")
    seen["job_detail_output"] = detail.locator("pre.output").inner_text()

    # Audit: lines as in the file and the chain's verdict.
    page.get_by_role("button", name="Audit", exact=True).click()
    expect(page.locator("#audit-verdict")).to_contain_text("verified")
    seen["audit_verdict"] = page.locator("#audit-verdict").inner_text()
    seen["audit_raw_lines"] = page.locator("#audit-lines .raw").all_inner_texts()
    shot(page, "console-audit.png")

    # Phone width: the commands view in one column.
    page.get_by_role("button", name="Commands", exact=True).click()
    page.set_viewport_size({"width": 390, "height": 844})
    seen["phone_scroll_width"] = page.evaluate("document.documentElement.scrollWidth")
    shot(page, "console-phone.png")
    page.set_viewport_size({"width": 1280, "height": 860})

    # Another origin, while the operator is signed in, tries to run `echo`.
    attacker = attacker_server(BASE)
    try:
        other = context.new_page()
        other_origin = f"http://127.0.0.1:{attacker.server_address[1]}"
        other.goto(other_origin + "/")
        other.wait_for_function("window.results && window.results.length === 3")
        other.wait_for_timeout(500)
        seen["cross_origin_results"] = sorted(other.evaluate("window.results"))
        seen["cross_origin_origin"] = other_origin
        other.close()
    finally:
        attacker.shutdown()

    # Sign out forgets the token.
    page.get_by_role("button", name="Sign out", exact=True).click()
    expect(page.get_by_label("Operator token")).to_be_visible()
    seen["token_after_sign_out"] = page.evaluate(
        "sessionStorage.getItem('portcullis.operatorToken')"
    )
    page.reload()
    expect(page.get_by_label("Operator token")).to_be_visible()
    seen["signed_in_after_reload"] = page.locator("#who").is_visible()
    seen["nav_visible_after_reload"] = page.locator("#nav").is_visible()


if __name__ == "__main__":
    try:
        main()
    finally:
        print(json.dumps(seen))
        sys.stdout.flush()
