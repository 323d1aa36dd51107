// portcullis operator console: a static page over the /__manage__ JSON API.
// The operator token lives in this tab's sessionStorage and travels only as
// an Authorization header on same-origin fetch() calls; no cookie is used.
"use strict";

(function () {
  const BASE = "/__manage__";
  const TOKEN_KEY = "portcullis.operatorToken";
  const STATUSES_FINAL = ["succeeded", "failed", "timed_out", "cancelled", "rejected", "lost"];

  const $ = (id) => document.getElementById(id);
  let token = null;
  let me = null; // GET /__manage__/ answer
  let selected = null; // the command whose form is shown
  const streams = new Set(); // AbortControllers of open output streams

  // ------------------------------------------------------------ helpers

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k === "text") node.textContent = v;
      else if (k === "class") node.className = v;
      else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
      else if (v === true) node.setAttribute(k, "");
      else node.setAttribute(k, String(v));
    }
    for (const c of children) {
      if (c === null || c === undefined) continue;
      node.append(c instanceof Node ? c : document.createTextNode(String(c)));
    }
    return node;
  }

  function clear(node) {
    while (node.firstChild) node.removeChild(node.firstChild);
  }

  class ApiError extends Error {
    constructor(status, message) {
      super(message);
      this.status = status;
    }
  }

  function headers(extra) {
    return Object.assign({ Authorization: "Bearer " + token }, extra || {});
  }

  async function api(method, path, body, extra) {
    const init = { method, headers: headers(extra), cache: "no-store", credentials: "omit", redirect: "error" };
    if (body !== undefined) {
      init.body = JSON.stringify(body);
      init.headers["Content-Type"] = "application/json";
    }
    const resp = await fetch(BASE + path, init);
    let json = null;
    try {
      json = await resp.json();
    } catch (_) {
      json = null;
    }
    if (resp.status === 401) {
      signOut("Your token was refused: sign in again.");
      throw new ApiError(401, "Operator token missing or invalid");
    }
    if (!resp.ok) {
      const msg = json && json.error && json.error.message ? json.error.message : resp.status + " " + resp.statusText;
      throw new ApiError(resp.status, msg);
    }
    return { status: resp.status, json };
  }

  function duration(ms) {
    if (ms === null || ms === undefined) return "";
    if (ms < 1000) return ms + " ms";
    const s = ms / 1000;
    if (s < 60) return s.toFixed(s < 10 ? 2 : 1) + " s";
    return Math.floor(s / 60) + " min " + Math.round(s % 60) + " s";
  }

  function when(rfc3339) {
    if (!rfc3339) return "";
    const d = new Date(rfc3339);
    return isNaN(d) ? rfc3339 : d.toLocaleString();
  }

  function statusBadge(status) {
    return el("span", { class: "status status-" + status, "data-status": status, text: status });
  }

  // ------------------------------------------------------------ sign-in

  async function signIn(candidate) {
    token = candidate;
    try {
      const { json } = await api("GET", "/");
      me = json;
    } catch (e) {
      token = null;
      me = null;
      throw e;
    }
    sessionStorage.setItem(TOKEN_KEY, token);
    $("operator-name").textContent = me.operator;
    $("who").hidden = false;
    $("nav").hidden = false;
    $("view-signin").hidden = true;
    renderCommands();
    probeOptionalViews();
    show("commands");
  }

  function signOut(message) {
    for (const c of streams) c.abort();
    streams.clear();
    token = null;
    me = null;
    selected = null;
    sessionStorage.removeItem(TOKEN_KEY);
    $("who").hidden = true;
    $("nav").hidden = true;
    for (const v of ["commands", "jobs", "runners", "audit"]) $("view-" + v).hidden = true;
    clear($("command-list"));
    clear($("command-detail"));
    clear($("jobs-table").tBodies[0]);
    clear($("jobs-detail"));
    clear($("audit-lines"));
    $("audit-verdict").textContent = "";
    $("view-signin").hidden = false;
    $("token").value = "";
    $("signin-error").textContent = message || "";
    $("token").focus();
  }

  let runnersShown = false;

  // The audit view needs an unrestricted operator; runners exist only when
  // configured. Both are shown only when the API answers for them.
  async function probeOptionalViews() {
    const auditBtn = document.querySelector('[data-view="audit"]');
    const runnersBtn = document.querySelector('[data-view="runners"]');
    auditBtn.hidden = true;
    runnersBtn.hidden = true;
    $("filter-runner-field").hidden = true;
    try {
      await api("GET", "/audit?limit=1");
      auditBtn.hidden = false;
    } catch (_) {
      /* not for this operator */
    }
    runnersShown = false;
    $("jobs-runner-col").hidden = true;
    try {
      const { json } = await api("GET", "/runners");
      if (json && Array.isArray(json.runners) && json.runners.length) {
        runnersShown = true;
        runnersBtn.hidden = false;
        $("filter-runner-field").hidden = false;
        $("jobs-runner-col").hidden = false;
      }
    } catch (_) {
      /* no runners configured (404), or not for this operator */
    }
  }

  // ------------------------------------------------------------ views

  function show(view) {
    for (const b of document.querySelectorAll("#nav button")) {
      if (b.dataset.view === view) b.setAttribute("aria-current", "page");
      else b.removeAttribute("aria-current");
    }
    for (const v of ["commands", "jobs", "runners", "audit"]) $("view-" + v).hidden = v !== view;
    if (view === "jobs") loadJobs(false);
    if (view === "audit") loadAudit(false);
    if (view === "runners") loadRunners();
  }

  // ------------------------------------------------------------ commands

  function renderCommands() {
    const list = $("command-list");
    clear(list);
    const names = $("command-names");
    clear(names);
    const filter = $("command-filter").value.trim().toLowerCase();
    for (const c of me.commands) {
      names.append(el("option", { value: c.name }));
      if (filter && !c.name.toLowerCase().includes(filter)) continue;
      const btn = el(
        "button",
        {
          type: "button",
          class: "command",
          "data-command": c.name,
          "aria-pressed": selected && selected.name === c.name ? "true" : "false",
          onclick: () => selectCommand(c),
        },
        el("span", { class: "name", text: c.name }),
        el("span", { class: "kind", text: c.kind }),
        c.help ? el("span", { class: "help", text: c.help }) : null
      );
      list.append(el("li", {}, btn));
    }
    const note = [];
    if (me.any_other_django_command) note.push("Any other Django command may also be run, except: " + (me.denied || []).join(", ") + ".");
    if (!me.commands.length) note.push("No commands are listed for you.");
    $("commands-note").textContent = note.join(" ");
  }

  function optionField(opt) {
    const id = "opt-" + opt.name;
    const label = el("label", { for: id, text: opt.name });
    // The default is shown, never sent: only what the operator fills in is.
    const hasDefault = opt.default !== null && opt.default !== undefined && opt.default !== "" && !Array.isArray(opt.default);
    const placeholder = hasDefault && opt.kind !== "bool" ? String(opt.default) : null;
    const hint = [];
    if (opt.help) hint.push(opt.help);
    if (opt.flag) hint.push(opt.flag);
    let input;
    if (opt.kind === "bool") {
      input = el("input", { id, type: "checkbox", name: opt.name });
      const wrap = el("div", { class: "field check" }, input, label);
      if (hint.length) wrap.append(el("p", { class: "hint", id: id + "-hint", text: hint.join(" · ") }));
      if (hint.length) input.setAttribute("aria-describedby", id + "-hint");
      return wrap;
    }
    if (opt.kind === "choice" && Array.isArray(opt.choices)) {
      input = el("select", { id, name: opt.name, multiple: opt.repeatable || null });
      if (!opt.repeatable) input.append(el("option", { value: "", text: placeholder ? "(default: " + placeholder + ")" : "(not given)" }));
      for (const ch of opt.choices) {
        input.append(el("option", { value: String(ch), text: String(ch) }));
      }
    } else if (opt.kind === "int" || opt.kind === "float") {
      input = el("input", {
        id,
        name: opt.name,
        type: "number",
        inputmode: opt.kind === "int" ? "numeric" : "decimal",
        step: opt.kind === "int" ? "1" : "any",
        min: opt.min,
        max: opt.max,
        placeholder,
      });
      if (opt.min !== null && opt.min !== undefined) hint.push("min " + opt.min);
      if (opt.max !== null && opt.max !== undefined) hint.push("max " + opt.max);
    } else {
      input = el("input", { id, name: opt.name, type: "text", autocomplete: "off", spellcheck: "false", placeholder });
      if (opt.pattern) hint.push("must match " + opt.pattern);
      if (opt.repeatable) hint.push("several values: one per line");
      if (opt.repeatable) {
        input = el("textarea", { id, name: opt.name, rows: 2, spellcheck: "false" });
      }
    }
    const field = el("div", { class: "field" }, label, input);
    if (hint.length) {
      field.append(el("p", { class: "hint", id: id + "-hint", text: hint.join(" · ") }));
      input.setAttribute("aria-describedby", id + "-hint");
    }
    return field;
  }

  function readOption(opt, form) {
    const node = form.elements.namedItem(opt.name);
    if (!node) return undefined;
    if (opt.kind === "bool") return node.checked ? true : undefined;
    if (node.tagName === "SELECT" && node.multiple) {
      const vals = Array.from(node.selectedOptions).map((o) => o.value);
      return vals.length ? vals : undefined;
    }
    const raw = node.value.trim();
    if (raw === "") return undefined;
    if (opt.repeatable) {
      const items = raw.split("\n").map((s) => s.trim()).filter(Boolean);
      return items.map((v) => (opt.kind === "int" ? Number.parseInt(v, 10) : opt.kind === "float" ? Number(v) : v));
    }
    if (opt.kind === "int") return Number.parseInt(raw, 10);
    if (opt.kind === "float") return Number(raw);
    return raw;
  }

  function selectCommand(c) {
    selected = c;
    for (const b of document.querySelectorAll("#command-list button")) {
      b.setAttribute("aria-pressed", b.dataset.command === c.name ? "true" : "false");
    }
    const box = $("command-detail");
    clear(box);
    const heading = el("h3", { id: "command-title", tabindex: "-1", text: c.name });
    box.append(heading);
    box.append(el("p", { class: c.help ? "help" : "hint", text: c.help || "No help text." }));
    const facts = [];
    if (c.metadata_only) facts.push("metadata-only: its output is never captured");
    if (c.lock) facts.push("lock " + c.lock + ": one run at a time");
    if (facts.length) box.append(el("p", { class: "hint", text: facts.join(" · ") }));
    if (c.available === false) {
      box.append(el("p", { class: "error", text: "Unavailable: " + (c.error || "unknown reason") }));
      return;
    }
    const form = el("form", { id: "run-form", class: "run-form", "aria-labelledby": "command-title" });
    const options = Array.isArray(c.options) ? c.options : [];
    for (const opt of options) form.append(optionField(opt));
    const accepted = c.args && c.args.accepted;
    if (accepted) {
      const hint = (c.args.help ? c.args.help + " · " : "") + "one argument per line";
      form.append(
        el(
          "div",
          { class: "field" },
          el("label", { for: "run-args", text: "Positional arguments" }),
          el("textarea", { id: "run-args", name: "__args", rows: 2, spellcheck: "false", "aria-describedby": "run-args-hint" }),
          el("p", { class: "hint", id: "run-args-hint", text: hint })
        )
      );
    }
    if (!options.length && !accepted) form.append(el("p", { class: "hint", text: "This command takes no options." }));
    form.append(el("div", { class: "actions" }, el("button", { type: "submit", id: "run-button", text: "Run" })));
    form.append(el("p", { class: "error", id: "run-error", role: "alert" }));
    const result = el("div", { id: "run-result" });
    form.addEventListener("submit", (ev) => {
      ev.preventDefault();
      runCommand(c, form, result);
    });
    box.append(form, result);
    heading.focus();
  }

  async function runCommand(c, form, result) {
    const errorBox = form.querySelector("#run-error");
    errorBox.textContent = "";
    const data = {};
    for (const opt of c.options || []) {
      const v = readOption(opt, form);
      if (v !== undefined && !(typeof v === "number" && Number.isNaN(v))) data[opt.name] = v;
    }
    const argsNode = form.elements.namedItem("__args");
    if (argsNode) {
      const items = argsNode.value.split("\n").map((s) => s.trim()).filter(Boolean);
      if (items.length) data.args = items;
    }
    const button = form.querySelector("#run-button");
    button.disabled = true;
    try {
      const { status, json } = await api("POST", "/" + encodeURIComponent(c.name), { data }, { Prefer: "respond-async" });
      const panel = jobPanel(result);
      if (status === 200) panel.finish(json, json.output || "");
      else follow(json.id, panel);
    } catch (e) {
      errorBox.textContent = e.message;
    } finally {
      button.disabled = false;
    }
  }

  // ------------------------------------------------------------ a job's result

  // A panel showing one job: status, exit code, duration, output, cancel.
  function jobPanel(container) {
    clear(container);
    const status = el("dd", { class: "job-status" });
    const exit = el("dd", { class: "job-exit" });
    const dur = el("dd", { class: "job-duration" });
    const idCell = el("dd", { class: "job-id" });
    const runnerCell = el("dd", { class: "job-runner" });
    const runnerFact = el("div", { hidden: true }, el("dt", { text: "Runner" }), runnerCell);
    const reason = el("p", { class: "hint job-reason" });
    const notice = el("p", { class: "notice job-notice", hidden: true });
    const out = el("pre", { class: "output", tabindex: "0", "aria-label": "Output", "aria-live": "off" });
    const cancel = el("button", { type: "button", class: "danger job-cancel", text: "Cancel", hidden: true });
    const live = el("p", { class: "sr-only", role: "status" });
    const box = el(
      "section",
      { class: "card job", "aria-label": "Job result" },
      el(
        "dl",
        { class: "facts" },
        el("div", {}, el("dt", { text: "Status" }), status),
        el("div", {}, el("dt", { text: "Exit code" }), exit),
        el("div", {}, el("dt", { text: "Duration" }), dur),
        el("div", {}, el("dt", { text: "Job" }), idCell),
        runnerFact
      ),
      reason,
      notice,
      cancel,
      out,
      live
    );
    container.append(box);
    const panel = {
      id: null,
      setRecord(rec) {
        panel.id = rec.id;
        idCell.textContent = rec.id || "";
        runnerCell.textContent = rec.runner || "";
        runnerFact.hidden = !rec.runner;
        clear(status);
        status.append(statusBadge(rec.status));
        exit.textContent = rec.exit_code === null || rec.exit_code === undefined ? "—" : String(rec.exit_code);
        dur.textContent = duration(rec.duration_ms) || "—";
        reason.textContent = rec.reason ? "Reason: " + rec.reason : "";
        const running = !STATUSES_FINAL.includes(rec.status);
        cancel.hidden = !running;
        if (rec.metadata_only) {
          notice.hidden = false;
          notice.textContent = "Metadata-only command: its output is never captured, stored or shown.";
        }
        live.textContent = "Status: " + rec.status;
      },
      append(text) {
        const atEnd = out.scrollTop + out.clientHeight >= out.scrollHeight - 4;
        out.append(document.createTextNode(text));
        if (atEnd) out.scrollTop = out.scrollHeight;
      },
      finish(rec, output) {
        panel.setRecord(rec);
        if (output !== undefined) {
          clear(out);
          panel.append(output);
        }
      },
      cancelButton: cancel,
    };
    cancel.addEventListener("click", async () => {
      cancel.disabled = true;
      try {
        await api("POST", "/jobs/" + encodeURIComponent(panel.id) + "/cancel");
        live.textContent = "Cancelling…";
        reason.textContent = "Cancelling…";
      } catch (e) {
        reason.textContent = e.message;
      } finally {
        cancel.disabled = false;
      }
    });
    return panel;
  }

  // Follows a job: its record, then its output stream (SSE read with fetch so
  // the bearer header goes along; EventSource cannot send one).
  async function follow(id, panel) {
    const ctrl = new AbortController();
    streams.add(ctrl);
    try {
      let { json: rec } = await api("GET", "/jobs/" + encodeURIComponent(id));
      // A job that ended already shows its final status only once its output
      // is on screen (below), never "succeeded" above an empty output.
      panel.setRecord(STATUSES_FINAL.includes(rec.status) ? { ...rec, status: "running", exit_code: null, duration_ms: null } : rec);
      const resp = await fetch(BASE + "/jobs/" + encodeURIComponent(id) + "/output", {
        headers: headers({ Accept: "text/event-stream" }),
        cache: "no-store",
        credentials: "omit",
        signal: ctrl.signal,
      });
      if (!resp.ok || !resp.body) throw new ApiError(resp.status, "could not open the output stream");
      const reader = resp.body.pipeThrough(new TextDecoderStream()).getReader();
      let buf = "";
      let ended = false;
      let sawOutput = false;
      while (!ended) {
        const { value, done } = await reader.read();
        if (done) break;
        buf += value.replace(/\r\n?/g, "\n");
        let cut;
        while ((cut = buf.indexOf("\n\n")) >= 0) {
          const block = buf.slice(0, cut);
          buf = buf.slice(cut + 2);
          let event = "message";
          const data = [];
          for (const line of block.split("\n")) {
            if (line.startsWith(":")) continue;
            const colon = line.indexOf(":");
            const field = colon < 0 ? line : line.slice(0, colon);
            let val = colon < 0 ? "" : line.slice(colon + 1);
            if (val.startsWith(" ")) val = val.slice(1);
            if (field === "event") event = val;
            else if (field === "data") data.push(val);
          }
          if (!data.length && event === "message") continue;
          if (event === "end") {
            ended = true;
            break;
          }
          if (!rec.metadata_only) {
            if (!sawOutput && rec.status === "queued") {
              // Claimed since: the record now says where it runs.
              const { json: now } = await api("GET", "/jobs/" + encodeURIComponent(id));
              rec = now;
              if (rec.status === "queued") rec.status = "running";
              panel.setRecord(rec);
            }
            sawOutput = true;
            panel.append(data.join("\n"));
          }
        }
      }
      ctrl.abort();
      // The final record carries exit code and duration.
      const { json: final } = await api("GET", "/jobs/" + encodeURIComponent(id));
      panel.setRecord(final);
    } catch (e) {
      if (e.name !== "AbortError") panel.append("\n[console: " + e.message + "]\n");
    } finally {
      streams.delete(ctrl);
    }
  }

  // ------------------------------------------------------------ jobs

  let jobsNext = null;

  function jobsQuery(before) {
    const form = $("jobs-filter");
    const q = new URLSearchParams();
    for (const name of ["command", "status", "operator", "runner"]) {
      const v = form.elements.namedItem(name).value.trim();
      if (v) q.set(name, v);
    }
    if (before) q.set("before", before);
    q.set("limit", "50");
    return q.toString();
  }

  async function loadJobs(more) {
    const body = $("jobs-table").tBodies[0];
    $("jobs-error").textContent = "";
    if (!more) {
      clear(body);
      clear($("jobs-detail"));
    }
    try {
      const { json } = await api("GET", "/jobs?" + jobsQuery(more ? jobsNext : null));
      for (const rec of json.jobs) {
        const open = el("button", { type: "button", class: "link", text: "Output", "aria-label": "Output of " + rec.command + " job " + rec.id, onclick: () => openJob(rec.id) });
        body.append(
          el(
            "tr",
            { "data-job": rec.id },
            el("td", { "data-label": "Created", text: when(rec.created_at) }),
            el("td", { "data-label": "Command" }, el("code", { text: rec.command })),
            el("td", { "data-label": "Status" }, statusBadge(rec.status)),
            el("td", { "data-label": "Exit", text: rec.exit_code === undefined || rec.exit_code === null ? "—" : String(rec.exit_code) }),
            el("td", { "data-label": "Duration", text: duration(rec.duration_ms) || "—" }),
            el("td", { "data-label": "Operator", text: rec.operator }),
            runnersShown ? el("td", { "data-label": "Runner", text: rec.runner || "this gateway" }) : null,
            el("td", { "data-label": "Job" }, open)
          )
        );
      }
      jobsNext = json.next;
      $("jobs-more").hidden = !jobsNext;
      $("jobs-empty").hidden = body.rows.length > 0;
    } catch (e) {
      $("jobs-error").textContent = e.message;
    }
  }

  function openJob(id) {
    const box = $("jobs-detail");
    clear(box);
    const heading = el("h3", { tabindex: "-1", text: "Job " + id });
    box.append(heading);
    const holder = el("div");
    box.append(holder);
    const panel = jobPanel(holder);
    follow(id, panel);
    heading.focus();
  }

  // ------------------------------------------------------------ runners

  async function loadRunners() {
    const body = $("runners-table").tBodies[0];
    clear(body);
    $("runners-error").textContent = "";
    try {
      const { json } = await api("GET", "/runners");
      for (const r of json.runners || []) {
        const jobs = Array.isArray(r.running_jobs) ? r.running_jobs : [];
        body.append(
          el(
            "tr",
            { "data-runner": r.name },
            el("td", { "data-label": "Name" }, el("code", { text: r.name })),
            el("td", { "data-label": "Groups", text: (r.groups || []).join(", ") || "—" }),
            el("td", { "data-label": "Connected" }, el("span", { class: "status status-" + (r.connected ? "succeeded" : "lost"), text: r.connected ? "connected" : "not connected" })),
            el("td", { "data-label": "Last seen", text: when(r.last_seen) || "never" }),
            el("td", { "data-label": "Running jobs", text: jobs.length ? jobs.join(", ") : "none" }),
            el("td", { "data-label": "Version", text: r.version || "—" })
          )
        );
      }
      $("runners-empty").hidden = body.rows.length > 0;
    } catch (e) {
      $("runners-error").textContent = e.message;
    }
  }

  // ------------------------------------------------------------ audit

  let auditNext = null;

  async function loadAudit(more) {
    const list = $("audit-lines");
    $("audit-error").textContent = "";
    if (!more) clear(list);
    try {
      const q = new URLSearchParams({ limit: "100" });
      if (more && auditNext) q.set("before", String(auditNext));
      const { json } = await api("GET", "/audit?" + q.toString());
      const verdict = $("audit-verdict");
      clear(verdict);
      verdict.className = json.verified ? "ok" : "error";
      verdict.append(
        el("strong", { text: json.verified ? "Hash chain verified." : "Hash chain BROKEN." }),
        json.verified ? " Every line up to the newest record is intact." : " " + (json.verify_error || "")
      );
      for (const line of json.lines) {
        let summary = "";
        try {
          const v = JSON.parse(line);
          summary = [v.seq, v.time, v.event, v.operator, v.command, v.status].filter((x) => x !== undefined && x !== null).join(" · ");
        } catch (_) {
          summary = "(not JSON)";
        }
        list.append(el("li", {}, el("p", { class: "summary", text: summary }), el("code", { class: "raw", text: line })));
      }
      auditNext = json.next;
      $("audit-more").hidden = !auditNext;
    } catch (e) {
      $("audit-error").textContent = e.message;
    }
  }

  // ------------------------------------------------------------ wiring

  document.addEventListener("DOMContentLoaded", () => {
    $("signin-form").addEventListener("submit", async (ev) => {
      ev.preventDefault();
      const value = $("token").value.trim();
      $("signin-error").textContent = "";
      if (!value) return;
      try {
        await signIn(value);
        $("token").value = "";
      } catch (e) {
        $("signin-error").textContent = e.status === 401 ? "That operator token was refused." : e.message;
      }
    });
    $("signout").addEventListener("click", () => signOut("Signed out."));
    for (const b of document.querySelectorAll("#nav button")) {
      b.addEventListener("click", () => show(b.dataset.view));
    }
    $("command-filter").addEventListener("input", renderCommands);
    $("jobs-filter").addEventListener("submit", (ev) => {
      ev.preventDefault();
      loadJobs(false);
    });
    $("jobs-more").addEventListener("click", () => loadJobs(true));
    $("audit-refresh").addEventListener("click", () => loadAudit(false));
    $("runners-refresh").addEventListener("click", loadRunners);
    $("audit-more").addEventListener("click", () => loadAudit(true));
    const saved = sessionStorage.getItem(TOKEN_KEY);
    if (saved) {
      signIn(saved).catch(() => signOut(""));
    } else {
      $("token").focus();
    }
  });
})();
