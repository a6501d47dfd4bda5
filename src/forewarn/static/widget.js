/* Forewarn widget: page views, active time and your own events in; in-app messages and the
 * chat out. Drop it into your pages:
 *
 *   <script src="https://forewarn.example.com/widget.js" async
 *           data-key="WRITE_KEY" data-user="USER_ID" data-token="IDENTITY_TOKEN"></script>
 *
 * then window.Forewarn.track("Search Performed", {query: "domains"}).
 * Messages are shown as text only: nothing from the server is ever inserted as HTML. */
(function () {
  "use strict";
  if (window.Forewarn && window.Forewarn.loaded) return;
  var me = document.currentScript || document.querySelector("script[data-key][src*='widget.js']");
  var cfg = window.forewarnSettings || {};
  function setting(name) {
    return cfg[name] || (me && me.getAttribute("data-" + name)) || "";
  }
  var key = setting("key");
  if (!key) { console.warn("forewarn: no data-key on the widget's script tag"); return; }
  var base = setting("host") || new URL(me ? me.src : location.href).origin;
  var token = setting("token");
  var prefix = setting("path-prefix");
  var HEARTBEAT_S = Number(setting("heartbeat")) || 15;
  var store = (function () { try { return window.localStorage; } catch (e) { return null; } })();
  function remember(name, value) { try { if (store) store.setItem(name, value); } catch (e) {} }
  function recall(name) { try { return store ? store.getItem(name) : null; } catch (e) { return null; } }
  var anon = recall("forewarn_anon");
  if (!anon) {
    anon = (window.crypto && crypto.randomUUID) ? crypto.randomUUID() : String(Math.random()).slice(2) + Date.now();
    remember("forewarn_anon", anon);
  }
  var dismissed = JSON.parse(recall("forewarn_dismissed") || "[]");

  function query(extra) {
    var q = "key=" + encodeURIComponent(key) + "&anon=" + encodeURIComponent(anon);
    return extra ? q + "&" + extra : q;
  }
  function headers() {
    var h = {"content-type": "application/json", "x-forewarn-anonymous-id": anon};
    if (token) h.authorization = "Bearer " + token;
    return h;
  }
  function call(method, path, body) {
    return fetch(base + path + (path.indexOf("?") < 0 ? "?" : "&") + query(), {
      method: method, headers: headers(), body: body ? JSON.stringify(body) : undefined,
      keepalive: method === "POST", credentials: "omit", mode: "cors"
    }).then(function (r) {
      if (r.status === 401 && token) {
        // an expired or wrong identity token: go on as the anonymous visitor
        console.warn("forewarn: the identity token was refused; continuing anonymously");
        token = "";
        return call(method, path, body);
      }
      if (!r.ok) throw new Error("forewarn: " + method + " " + path + " answered " + r.status);
      return r.json();
    });
  }

  // --- events in ---------------------------------------------------------------------------
  var queue = [];
  function now() { return new Date().toISOString(); }
  function path() {
    var p = location.pathname;
    return prefix && p.indexOf(prefix) === 0 ? p.slice(prefix.length) || "/" : p;
  }
  function enqueue(message) {
    message.timestamp = now();
    message.messageId = (window.crypto && crypto.randomUUID) ? crypto.randomUUID() : anon + "-" + Date.now() + "-" + queue.length;
    message.context = {library: {name: "forewarn-widget", version: "1"}, page: {path: path(), url: location.href, title: document.title}};
    queue.push(message);
    if (queue.length >= 20) flush();
  }
  function flush() {
    if (!queue.length) return;
    var batch = queue.splice(0, queue.length);
    call("POST", "/w/v1/events", {batch: batch}).catch(function (e) { console.warn(e); });
  }
  setInterval(flush, 2000);
  document.addEventListener("visibilitychange", function () { if (document.visibilityState === "hidden") flush(); });

  var lastPath = null;
  function page() {
    var p = path();
    if (p === lastPath) return;
    lastPath = p;
    enqueue({type: "page", name: document.title, properties: {path: p, url: location.href, title: document.title, referrer: document.referrer}});
    flush();
  }
  ["pushState", "replaceState"].forEach(function (name) {
    var original = history[name];
    history[name] = function () {
      var result = original.apply(this, arguments);
      setTimeout(page, 0);
      return result;
    };
  });
  window.addEventListener("popstate", page);
  window.addEventListener("hashchange", page);

  setInterval(function () {
    if (document.visibilityState === "visible" && document.hasFocus()) {
      enqueue({type: "track", event: "Active Time", properties: {seconds: HEARTBEAT_S, path: path()}});
    }
  }, HEARTBEAT_S * 1000);

  // --- messages out --------------------------------------------------------------------------
  var host = document.createElement("div");
  host.id = "forewarn-widget";
  var root = host.attachShadow ? host.attachShadow({mode: "open"}) : host;
  var style = document.createElement("style");
  style.textContent =
    ".fw-card{position:fixed;right:20px;bottom:90px;max-width:340px;background:#fff;color:#222;border-radius:10px;" +
    "box-shadow:0 6px 24px rgba(0,0,0,.18);padding:14px 16px;font:14px/1.4 system-ui,sans-serif;z-index:2147483000}" +
    ".fw-title{font-weight:600;margin:0 24px 6px 0}.fw-close{position:absolute;top:8px;right:10px;border:0;background:none;font-size:18px;cursor:pointer}" +
    ".fw-bubble{position:fixed;right:20px;bottom:20px;width:56px;height:56px;border-radius:50%;border:0;background:#3b5bdb;color:#fff;font-size:24px;cursor:pointer;z-index:2147483000}" +
    ".fw-chat{position:fixed;right:20px;bottom:90px;width:340px;max-height:460px;display:flex;flex-direction:column;background:#fff;color:#222;border-radius:10px;box-shadow:0 6px 24px rgba(0,0,0,.18);font:14px/1.4 system-ui,sans-serif;z-index:2147483000}" +
    ".fw-log{flex:1;overflow:auto;padding:12px}.fw-msg{margin:6px 0;padding:8px 10px;border-radius:8px;white-space:pre-wrap;word-wrap:break-word}" +
    ".fw-assistant{background:#f1f3f5}.fw-user{background:#dbe4ff;margin-left:40px}.fw-form{display:flex;border-top:1px solid #eee}" +
    ".fw-form input{flex:1;border:0;padding:10px;font:inherit}.fw-form button{border:0;background:none;color:#3b5bdb;padding:0 12px;cursor:pointer}";
  root.appendChild(style);
  function attach() { if (!host.parentNode) document.body.appendChild(host); }

  function engage(message, event, extra) {
    if (!message.engagement_url) return;
    var body = {event: event};
    for (var k in extra || {}) body[k] = extra[k];
    // the link's path, on the server this widget talks to
    var url = base + new URL(message.engagement_url, base).pathname;
    fetch(url, {method: "POST", headers: {"content-type": "application/json"}, body: JSON.stringify(body), keepalive: true, credentials: "omit"})
      .catch(function () {});
  }
  // text with its http(s) links made clickable; everything else stays text
  function fill(el, text, message) {
    var parts = String(text).split(/(https?:\/\/[^\s<>"']+)/g);
    parts.forEach(function (part, i) {
      if (i % 2 === 1) {
        var a = document.createElement("a");
        a.href = part; a.textContent = part; a.target = "_blank"; a.rel = "noopener noreferrer";
        a.addEventListener("click", function () { engage(message, "clicked", {url: part}); });
        el.appendChild(a);
      } else if (part) {
        el.appendChild(document.createTextNode(part));
      }
    });
  }
  function dismiss(message, el) {
    dismissed.push(message.id);
    remember("forewarn_dismissed", JSON.stringify(dismissed.slice(-200)));
    engage(message, "dismissed");
    if (el.parentNode) el.parentNode.removeChild(el);
  }
  function showCard(message) {
    var card = document.createElement("div");
    card.className = "fw-card"; card.setAttribute("role", "status");
    var close = document.createElement("button");
    close.className = "fw-close"; close.textContent = "\u00d7"; close.setAttribute("aria-label", "Dismiss");
    close.addEventListener("click", function () { dismiss(message, card); });
    var title = document.createElement("div");
    title.className = "fw-title"; title.textContent = message.title;
    var text = document.createElement("div");
    fill(text, message.text, message);
    card.appendChild(close); card.appendChild(title); card.appendChild(text);
    root.appendChild(card); attach();
    engage(message, "opened");
  }

  var chat = null;
  function line(author, text, message) {
    var el = document.createElement("div");
    el.className = "fw-msg " + (author === "user" ? "fw-user" : "fw-assistant");
    el.setAttribute("data-author", author === "user" ? "user" : "assistant");
    fill(el, text, message);
    chat.log.appendChild(el);
    chat.log.scrollTop = chat.log.scrollHeight;
  }
  function openChat(message) {
    if (chat && chat.message.id === message.id) { chat.panel.style.display = "flex"; return; }
    if (chat) root.removeChild(chat.panel);
    var panel = document.createElement("div");
    panel.className = "fw-chat"; panel.setAttribute("role", "dialog"); panel.setAttribute("aria-label", "Chat");
    var close = document.createElement("button");
    close.className = "fw-close"; close.textContent = "\u00d7"; close.setAttribute("aria-label", "Close chat");
    var log = document.createElement("div"); log.className = "fw-log";
    var form = document.createElement("form"); form.className = "fw-form";
    var input = document.createElement("input"); input.placeholder = "Write a reply\u2026"; input.maxLength = 2000;
    var send = document.createElement("button"); send.type = "submit"; send.textContent = "Send";
    form.appendChild(input); form.appendChild(send);
    panel.appendChild(close); panel.appendChild(log); panel.appendChild(form);
    chat = {panel: panel, log: log, message: message};
    close.addEventListener("click", function () { panel.style.display = "none"; dismiss(message, document.createElement("i")); });
    form.addEventListener("submit", function (e) {
      e.preventDefault();
      var text = input.value.trim();
      if (!text) return;
      input.value = "";
      line("user", text, message);
      call("POST", "/w/v1/conversations/" + message.id + "/reply", {text: text})
        .then(function (answer) { line("assistant", answer.text, message); })
        .catch(function (err) { console.warn(err); });
    });
    root.appendChild(panel); attach();
    if (!bubble.parentNode) root.appendChild(bubble);
    call("GET", "/w/v1/conversations/" + message.id).then(function (c) {
      c.messages.forEach(function (m) { line(m.author, m.text, message); });
    }).catch(function () { line("assistant", message.text, message); });
    engage(message, "opened");
  }
  var bubble = document.createElement("button");
  bubble.className = "fw-bubble"; bubble.textContent = "\u2709"; bubble.setAttribute("aria-label", "Open chat");
  bubble.addEventListener("click", function () { if (chat) chat.panel.style.display = chat.panel.style.display === "none" ? "flex" : "none"; });

  var seen = {};
  function show(message) {
    if (seen[message.id] || dismissed.indexOf(message.id) >= 0 || message.dismissed) return;
    seen[message.id] = true;
    if (message.kind === "chat") openChat(message); else showCard(message);
  }

  var lastId = 0;
  function listen() {
    if (!window.EventSource) return;
    var extra = "since=" + lastId + (token ? "&token=" + encodeURIComponent(token) : "");
    var source = new EventSource(base + "/w/v1/stream?" + query(extra));
    source.addEventListener("message", function (e) {
      var message = JSON.parse(e.data);
      lastId = Math.max(lastId, message.id);
      show(message);
    });
  }

  function start() {
    page();
    call("GET", "/w/v1/inbox").then(function (answer) {
      answer.messages.forEach(function (m) { lastId = Math.max(lastId, m.id); });
      answer.messages.slice().reverse().forEach(function (m) {
        // what came before this visit stays in the inbox; only a chat still open is shown
        if (m.kind === "chat" && !m.dismissed && Date.now() - m.created < 3600000) show(m);
      });
      listen();
    }).catch(function (e) { console.warn(e); listen(); });
  }

  window.Forewarn = {
    loaded: true,
    track: function (name, properties) { enqueue({type: "track", event: String(name), properties: properties || {}}); },
    page: page,
    flush: flush
  };
  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start); else start();
})();
