/* flask_bits live view: polls the JSON endpoint and updates the table in place.
 * No framework, no build step. Every value from the server goes through textContent
 * or setAttribute, never innerHTML. */
(function () {
  "use strict";

  var root = document.getElementById("bits-dashboard");
  if (!root) { return; }
  var tbody = root.querySelector("#bits-sessions tbody");
  var statusEl = document.getElementById("bits-status");
  var errorEl = document.getElementById("bits-error");
  var emptyEl = document.getElementById("bits-empty");
  var sessionsUrl = root.dataset.sessionsUrl;
  var cancelUrl = root.dataset.cancelUrl;
  var csrfHeader = root.dataset.csrfHeader;
  var interval = Math.max(parseInt(root.dataset.interval, 10) || 1000, 200);
  var RATE_WINDOW = 5; // seconds of samples behind the throughput figure

  var samples = new Map(); // session id -> [[server time, received], ...]
  var timer = null;
  var inFlight = false;

  function formatBytes(n) {
    if (n === null || n === undefined) { return "?"; }
    var units = ["B", "KiB", "MiB", "GiB", "TiB"];
    var i = 0;
    while (Math.abs(n) >= 1024 && i < units.length - 1) { n /= 1024; i++; }
    return i === 0 ? n.toFixed(0) + " B" : n.toFixed(1) + " " + units[i];
  }

  function formatSeconds(s) {
    s = Math.max(Math.floor(s), 0);
    function pad(x) { return (x < 10 ? "0" : "") + x; }
    if (s < 60) { return s + "s"; }
    if (s < 3600) { return Math.floor(s / 60) + "m " + pad(s % 60) + "s"; }
    if (s < 86400) { return Math.floor(s / 3600) + "h " + pad(Math.floor(s % 3600 / 60)) + "m"; }
    return Math.floor(s / 86400) + "d " + pad(Math.floor(s % 86400 / 3600)) + "h";
  }

  function el(tag, className, text) {
    var node = document.createElement(tag);
    if (className) { node.className = className; }
    if (text !== undefined) { node.textContent = text; }
    return node;
  }

  /* Bytes per second over the last few seconds of polls (null until two samples). */
  function rateOf(s, now) {
    var list = samples.get(s.id) || [];
    list.push([now, s.received]);
    while (list.length > 2 && now - list[0][0] > RATE_WINDOW) { list.shift(); }
    samples.set(s.id, list);
    if (list.length < 2) { return null; }
    var first = list[0], last = list[list.length - 1];
    var dt = last[0] - first[0];
    return dt > 0 ? Math.max(last[1] - first[1], 0) / dt : null;
  }

  function buildRow(id) {
    var tr = document.createElement("tr");
    tr.dataset.sessionId = id;
    tr.appendChild(el("td", "directory"));
    var file = el("td", "file");
    file.appendChild(el("span", "path"));
    file.appendChild(el("span", "sid"));
    tr.appendChild(file);
    tr.appendChild(el("td", "owner"));
    var prog = el("td", "progress-col");
    prog.appendChild(document.createElement("progress"));
    prog.appendChild(el("span", "amount"));
    tr.appendChild(prog);
    tr.appendChild(el("td", "rate num"));
    tr.appendChild(el("td", "idle num"));
    var phase = el("td", "phase");
    phase.appendChild(el("span", "badge"));
    tr.appendChild(phase);
    tr.appendChild(el("td", "reply"));
    var actions = el("td", "actions");
    var button = el("button", "cancel", "Cancel");
    button.type = "button";
    button.dataset.sessionId = id;
    actions.appendChild(button);
    tr.appendChild(actions);
    return tr;
  }

  function fillRow(tr, s, rate) {
    tr.dataset.received = String(s.received);
    tr.querySelector(".directory").textContent = s.directory;
    var path = tr.querySelector(".path");
    path.textContent = s.remote_path;
    path.title = s.remote_path;
    tr.querySelector(".sid").textContent = s.id;
    tr.querySelector(".owner").textContent = s.owner || "\u2014";
    var bar = tr.querySelector("progress");
    if (s.total === null) {
      bar.removeAttribute("value"); // indeterminate: no fragment yet
      bar.removeAttribute("max");
    } else {
      bar.max = s.total || 1;
      bar.value = s.total ? s.received : 1;
    }
    var amount = formatBytes(s.received) + " / " + formatBytes(s.total);
    if (s.progress !== null) { amount += " (" + Math.floor(s.progress * 100) + "%)"; }
    tr.querySelector(".amount").textContent = amount;
    // Live rate while receiving; the average over the session for the others.
    var shown = s.phase === "receiving" && rate !== null ? rate : s.average_rate;
    tr.querySelector(".rate").textContent = shown === null ? "\u2014" : formatBytes(shown) + "/s";
    tr.querySelector(".idle").textContent = formatSeconds(s.idle);
    var badge = tr.querySelector(".phase .badge");
    badge.textContent = s.phase;
    badge.className = "badge phase-" + s.phase;
    var reply = tr.querySelector(".reply");
    reply.textContent = "";
    if (s.reply) {
      reply.appendChild(el("span", "badge reply-" + s.reply, s.reply));
    } else {
      reply.textContent = "\u2014";
    }
  }

  function showError(message) {
    if (message) {
      errorEl.textContent = message;
      errorEl.hidden = false;
    } else {
      errorEl.textContent = "";
      errorEl.hidden = true;
    }
  }

  function render(data) {
    var existing = new Map();
    Array.prototype.forEach.call(tbody.rows, function (tr) {
      existing.set(tr.dataset.sessionId, tr);
    });
    var seen = new Set();
    data.sessions.forEach(function (s, index) {
      seen.add(s.id);
      var tr = existing.get(s.id);
      if (!tr) { tr = buildRow(s.id); }
      fillRow(tr, s, rateOf(s, data.now));
      if (tbody.rows[index] !== tr) { tbody.insertBefore(tr, tbody.rows[index] || null); }
    });
    existing.forEach(function (tr, id) {
      if (!seen.has(id)) { tr.remove(); samples.delete(id); }
    });
    samples.forEach(function (_, id) { if (!seen.has(id)) { samples.delete(id); } });
    emptyEl.hidden = data.sessions.length > 0;
    var text = data.count + " open session" + (data.count === 1 ? "" : "s");
    if (data.truncated) { text += " (showing the oldest " + data.sessions.length + ")"; }
    text += " \u00b7 directories: " + (data.directories.join(", ") || "none");
    text += " \u00b7 updated " + new Date(data.now * 1000).toLocaleTimeString();
    statusEl.textContent = text;
    showError(data.errors && data.errors.length ? data.errors.join(" ") : "");
  }

  function schedule() {
    if (timer !== null) { clearTimeout(timer); }
    timer = setTimeout(poll, interval);
  }

  function poll() {
    timer = null;
    if (document.hidden || inFlight) { schedule(); return; }
    inFlight = true;
    fetch(sessionsUrl, {
      credentials: "same-origin",
      cache: "no-store",
      headers: { "Accept": "application/json" }
    }).then(function (response) {
      if (!response.ok) {
        throw new Error("The server answered " + response.status +
          (response.status === 401 || response.status === 403 ? ": reload the page to sign in." : "."));
      }
      return response.json();
    }).then(render).catch(function (err) {
      showError("Live update failed: " + err.message);
    }).then(function () {
      inFlight = false;
      schedule();
    });
  }

  function pollNow() {
    if (timer !== null) { clearTimeout(timer); timer = null; }
    if (!inFlight) { poll(); }
  }

  function cancel(button) {
    var tr = button.closest("tr");
    var id = button.dataset.sessionId;
    var path = tr ? tr.querySelector(".path").textContent : id;
    var owner = tr ? tr.querySelector(".owner").textContent : "";
    if (!window.confirm("Cancel the upload of " + path + " (owner " + owner + ")?\n" +
                        "Its data is deleted and the client's transfer fails.")) {
      return;
    }
    button.disabled = true;
    var headers = {};
    headers[csrfHeader] = "1";
    fetch(cancelUrl.replace("SESSION_ID", encodeURIComponent(id)), {
      method: "POST",
      credentials: "same-origin",
      cache: "no-store",
      headers: headers
    }).then(function (response) {
      return response.json().catch(function () { return {}; }).then(function (body) {
        if (response.ok || response.status === 404) {
          if (tr) { tr.remove(); }
          samples.delete(id);
          showError("");
        } else {
          button.disabled = false;
          showError("Cancel failed: " + (body.error || ("status " + response.status)));
        }
      });
    }).catch(function (err) {
      button.disabled = false;
      showError("Cancel failed: " + err.message);
    }).then(pollNow);
  }

  tbody.addEventListener("click", function (event) {
    var button = event.target.closest("button.cancel");
    if (button && !button.disabled) { cancel(button); }
  });
  document.addEventListener("visibilitychange", function () {
    if (!document.hidden) { pollNow(); }
  });
  pollNow();
})();
