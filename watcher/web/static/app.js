// release-watcher web page: live view over server-sent events, writes with the caller's
// Consul token. Plain JavaScript, no build step. The token lives in sessionStorage only.
"use strict";

const TOKEN_KEY = "watcher-consul-token";
const body = document.body;
const app = body.dataset.app;
// The path a reverse proxy serves this server under (`watcher web --root-path`), "" for none.
const root = body.dataset.root || "";
let lastInflight;  // undefined until the first snapshot
let lastSections;  // the digest of the fleet and builds sections the server last sent
let stale = false;  // the sections may have missed a change (Consul was down, the stream broke)

function token() { return sessionStorage.getItem(TOKEN_KEY) || ""; }
function authHeaders() { const t = token(); return t ? { "Authorization": "Bearer " + t } : {}; }
function showTokenState() { document.getElementById("forget-token").hidden = !token(); }
// Consul refused the token the page reads with (unknown to it, or without read on the app):
// dropped, as a refused write drops it, so that a reload does not send it again.
function dropToken() { sessionStorage.removeItem(TOKEN_KEY); showTokenState(); }

function say(text, isError) {
  const el = document.getElementById("message");
  el.textContent = text;
  el.classList.toggle("error", !!isError);
  el.hidden = !text;
}

function consulStatus(text) {
  const el = document.getElementById("consul-status");
  el.textContent = text;
  el.hidden = !text;
}

// Re-render the fleet, builds and history from the server (same templates as a reload).
// One fetch at a time, and one more after it when asked meanwhile: a burst of changes (every
// host flipping) costs two fetches, and an older answer never lands after a newer one. The
// next one starts REFRESH_SPACING_MS after the one before it at the earliest: a key that
// changes without pause (a host's token can rewrite its own record) costs the server one
// page render a second per open page, not one per change.
const REFRESH_SPACING_MS = 1000;
let refreshing = null;
let refreshAgain = false;
let lastRefresh = -Infinity;  // performance.now() when the last fetch started
function refreshSections() {
  if (refreshing) { refreshAgain = true; return refreshing; }
  refreshing = (async () => {
    try {
      do {
        refreshAgain = false;
        const rest = lastRefresh + REFRESH_SPACING_MS - performance.now();
        if (rest > 0) await new Promise((r) => setTimeout(r, rest));
        refreshAgain = false;  // this fetch covers what was asked while it waited
        lastRefresh = performance.now();
        await refreshOnce();
      } while (refreshAgain);
    } finally {
      refreshing = null;
    }
  })();
  return refreshing;
}

async function refreshOnce() {
  const sent = token();
  const resp = await fetch(location.pathname, { headers: authHeaders() });
  // The answer is the page with Consul's refusal and a button to enter another token.
  if ((resp.status === 401 || resp.status === 403) && sent && sent === token()) dropToken();
  const doc = new DOMParser().parseFromString(await resp.text(), "text/html");
  const fresh = doc.getElementById("content");
  const here = document.getElementById("content");
  if (!fresh) return;
  // The page asks for a token now (this one refused, revoked meanwhile): the live stream
  // that opened with it goes too (the server asks Consul about it again only every 30 s).
  if (fresh.querySelector("#token-needed")) stopLive();
  // A keyboard user's place: the same button in the fresh sections gets the focus back.
  const focused = document.activeElement;
  const place = focused && here.contains(focused) && focused.matches("button") ? focusKey(focused) : null;
  if (!here.querySelector("#fleet") || !fresh.querySelector("#fleet")) {
    here.innerHTML = fresh.innerHTML;
  } else {
    for (const id of ["fleet", "builds", "history"]) {
      here.querySelector("#" + id).innerHTML = fresh.querySelector("#" + id).innerHTML;
    }
  }
  if (place) {
    const again = [...here.querySelectorAll("button")].find((b) => focusKey(b) === place);
    if (again) again.focus();
  }
  const status = doc.getElementById("consul-status");
  consulStatus(status && !status.hidden ? status.textContent : "");
}

function focusKey(button) {
  const d = button.dataset;
  return [button.closest("section")?.id, d.action, d.artifact, d.release, d.deploy, button.id].join("|");
}

function onSnapshot(snap) {
  if (snap.consul && !snap.consul.ok) {
    const what = snap.consul.unreachable === false ? "The live view cannot read this app: " : "Consul is unreachable: ";
    consulStatus(what + snap.consul.error + " (retrying)");
    stale = true;
    return;
  }
  consulStatus("");
  const live = document.getElementById("live");
  if (live) live.innerHTML = snap.html;
  const changed = lastInflight !== undefined && lastInflight !== snap.inflight;
  // A host went down or came back, a new build: not a deploy's ack (those are in `live`).
  const moved = lastSections !== undefined && lastSections !== snap.sections;
  if (changed || moved || stale) refreshSections();
  stale = false;
  lastInflight = snap.inflight;
  lastSections = snap.sections;
}

// The live view reads the event stream with fetch, not EventSource: fetch sends the
// Authorization header, and EventSource gives up for good on the first answer that is not
// a 200 (a 503 when the server's streams are all taken) while this loop retries. One loop
// a page: asked again (a token entered or forgotten), it drops its connection and opens
// another with the token the page now has.
let liveLoop = null;
let liveConnection = null;  // the AbortController of the loop's open connection
let liveStopped = false;
function connectLive() {
  liveStopped = false;
  if (liveLoop) { liveConnection?.abort(); return; }
  liveLoop = streamWithFetch(root + "/api/v1/apps/" + encodeURIComponent(app) + "/live")
    .finally(() => { liveLoop = null; });
}
function stopLive() { liveStopped = true; liveConnection?.abort(); }
// After the sections were fetched again with the page's token (one entered or forgotten):
// stream with it, or not at all where the page now asks for a token. In this order, not
// at once: a stream refused after the page dropped the token would say only that a token
// is needed, over Consul's refusal of the one entered.
function followLive() {
  if (!app) return;
  if (document.getElementById("token-needed")) stopLive(); else connectLive();
}

// A browser opens about 6 connections per server over HTTP/1.1 and each live view holds
// one: a 7th tab would never load, and a write from any of them would wait behind the
// streams. So a hidden tab lets its stream go, and catches up when it is shown again.
function whenVisible() {
  if (!document.hidden) return Promise.resolve();
  return new Promise((resolve) => {
    const shown = () => {
      if (document.hidden) return;
      document.removeEventListener("visibilitychange", shown);
      resolve();
    };
    document.addEventListener("visibilitychange", shown);
  });
}

async function streamWithFetch(url) {
  for (;;) {
    let reader = null;
    await whenVisible();
    if (liveStopped) return;
    const hidden = new AbortController();  // hidden, or connectLive asked for another
    liveConnection = hidden;
    const onHide = () => { if (document.hidden) hidden.abort(); };
    document.addEventListener("visibilitychange", onHide);
    try {
      const sent = token();
      const resp = await fetch(url, { headers: authHeaders(), signal: hidden.signal });
      if (!resp.ok) {
        const err = await resp.json().catch(() => ({ error: resp.statusText }));
        consulStatus(err.error || ("HTTP " + resp.status));
        stale = true;
        if (resp.status === 401 || resp.status === 403) {
          // The page's sections get the same refusal and the button for another token.
          if (sent && sent === token()) { dropToken(); refreshSections(); }
          return;
        }
        if (resp.status === 404) return;
      } else {
        reader = resp.body.getReader();
        const decoder = new TextDecoder();
        let buffer = "";
        for (;;) {
          const { value, done } = await reader.read();
          if (done) { stale = true; break; }  // what changed meanwhile: refresh
          buffer += decoder.decode(value, { stream: true });
          let cut;
          while ((cut = buffer.indexOf("\n\n")) >= 0) {
            const block = buffer.slice(0, cut).split("\n");
            buffer = buffer.slice(cut + 2);
            const event = (block.find((l) => l.startsWith("event: ")) || "event: message").slice(7);
            const data = block.filter((l) => l.startsWith("data: ")).map((l) => l.slice(6)).join("\n");
            if (!data) continue;
            if (event === "live") onSnapshot(JSON.parse(data));
            if (event === "refused") {
              // The server asked Consul again and the token may no longer read this app
              // (revoked, its policy changed): the same as a refused connect.
              // The server ends the stream after it; with another token by now, the loop
              // connects again with that one.
              consulStatus(JSON.parse(data).error);
              stale = true;
              if (sent && sent === token()) { dropToken(); refreshSections(); return; }
            }
          }
        }
      }
    } catch (e) {
      stale = true;
      if (hidden.signal.aborted) continue;  // hidden: let go, caught up once shown
      consulStatus("lost the connection to watcher web; reconnecting");
    } finally {
      liveConnection = null;
      document.removeEventListener("visibilitychange", onHide);
      // An event that did not parse leaves the stream open: close it before the next one,
      // or every retry would hold one of the server's per-caller slots (and the browser's).
      if (reader) reader.cancel().catch(() => {});
    }
    await new Promise((r) => setTimeout(r, 2000));
  }
}

// --- writes: confirm, ask for the token once per browser session, show Consul's answer -----

function askDialog(question, wantToken) {
  const dialog = document.getElementById("write-dialog");
  document.getElementById("write-what").textContent = question;
  const label = document.getElementById("token-label");
  const input = document.getElementById("token-input");
  label.hidden = !wantToken;
  document.getElementById("token-hint").hidden = !wantToken;
  input.value = "";
  return new Promise((resolve) => {
    dialog.addEventListener("close", () => {
      if (dialog.returnValue !== "ok") return resolve(false);
      if (wantToken && input.value.trim()) sessionStorage.setItem(TOKEN_KEY, input.value.trim());
      showTokenState();
      resolve(true);
    }, { once: true });
    dialog.showModal();
    (wantToken ? input : document.getElementById("write-confirm")).focus();
  });
}

async function write(button, allowMissing, seen) {
  const action = button.dataset.action;
  const base = root + "/api/v1/apps/" + encodeURIComponent(app);
  let url, payload, question;
  if (action === "deploy") {
    url = base + "/deploys"; payload = { artifact: button.dataset.artifact };
    question = "Deploy " + button.dataset.artifact + " to every host of " + app + "?";
  } else if (action === "rollback") {
    // The release the button names, never "whatever is previous when the request lands": a
    // deploy made while the dialog was open would otherwise be undone. The previous-release
    // button sends it as `previous`: the server's checks of a plain rollback still apply.
    const previous = button.dataset.previous;
    url = base + "/rollbacks";
    payload = previous ? { previous: previous } : { release: button.dataset.release };
    question = "Roll " + app + " back to " + (previous || button.dataset.release) + "?";
  } else {
    url = base + "/deploys/" + encodeURIComponent(button.dataset.deploy) + "/abort"; payload = {};
    question = "Abort deploy " + button.dataset.deploy + "?";
  }
  // A deploy or rollback only from the release this page shows the fleet on at the click:
  // once another deploy has ended since (another tab, another operator), the API refuses
  // it rather than replace that deploy's release unseen.
  // Asked again (allow_missing): the release of the first question, not one shown since.
  // "" is a fleet on no release yet (its first deploy): sent too, so that a tab shown it
  // before a first deploy ended cannot deploy over that one unseen. No release shown (the
  // fleet's is unreadable): nothing sent, no check.
  const shown = document.querySelector("#fleet .release[data-release]");
  const current = seen !== undefined ? seen : shown ? shown.dataset.release : undefined;
  if (action !== "abort" && current !== undefined) {
    payload.current = current;
    question = question.slice(0, -1) + " (now on " + (current || "nothing yet") + ")?";
  }
  if (allowMissing) {
    payload.allow_missing = true;
    question = allowMissing + " " + (action === "deploy" ? "Deploy" : "Roll back") +
      " to the live members only" + (current ? " (the fleet on " + current + ")" : "") +
      "? The hosts named keep their release and follow the fleet when their watcher is back.";
  }
  // With Consul's ACLs off a token proves nothing and writes are local only: none asked.
  if (!(await askDialog(question, !token() && body.dataset.acls !== "off"))) return;
  say("sending…");
  let resp, data;
  try {
    resp = await fetch(url, {
      method: "POST",
      headers: { "Content-Type": "application/json", ...authHeaders() },
      body: JSON.stringify(payload),
    });
    data = await resp.json().catch(() => ({ error: resp.statusText }));
  } catch (e) {
    return say("watcher web did not answer: " + e, true);
  }
  if (!resp.ok) {
    if (resp.status === 401 || resp.status === 403) dropToken();
    // Known hosts without a member key: the API asks for allow_missing, which this page
    // sends only when asked again, naming them.
    if (resp.status === 409 && !allowMissing && action !== "abort" && /"allow_missing": true/.test(data.error || "")) {
      say("");
      return write(button, data.error.split(";")[0] + ".", current);
    }
    return say(data.error || ("HTTP " + resp.status), true);
  }
  if (action === "abort") {
    const first = data.already_requested_by ? " (asked first by " + data.already_requested_by + ")" : "";
    say(data.aborted ? "deploy " + data.deploy + " aborted" + first
      : "abort of deploy " + data.deploy + " requested" + first + "; not decided yet (" + data.result +
        "): a host that acked ready before it can still decide it; the live view shows how it ends");
  } else {
    say(data.kind + " " + data.deploy + " of " + data.release + " started by " + data.requested_by +
      (data.warning ? ". Warning: " + data.warning : ""), !!data.warning);
  }
}

document.addEventListener("click", (ev) => {
  const button = ev.target.closest("button");
  if (!button) return;
  if (button.classList.contains("write")) write(button);
  else if (button.id === "forget-token") {
    dropToken();
    // Shown as this browser now reads: without a token, the page asks for one where it must.
    refreshSections().then(followLive);
  }
  else if (button.id === "enter-token") {
    askDialog("Your Consul ACL token, to read " + app + ":", true).then((ok) => {
      if (ok) refreshSections().then(followLive);
    });
  }
});

showTokenState();
// No app (an unknown one was asked for, or none is configured): nothing to stream.
if (app && (body.dataset.needsToken !== "yes" || token())) {
  if (body.dataset.needsToken === "yes") refreshSections();
  connectLive();
}
