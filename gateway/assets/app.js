// patchflow's page script. The server renders every page in full; this only enhances it:
// live task list, instant search, a task followed over Server-Sent Events, and Cancel /
// Retry without leaving the page. Text from the server goes in with textContent only; HTML
// is only ever taken from our own server-rendered pages, whose content is escaped there.
"use strict";
(() => {
  const $ = (s, el = document) => el.querySelector(s);
  const $$ = (s, el = document) => [...el.querySelectorAll(s)];

  const ago = (iso) => {
    const s = Math.max(0, (Date.now() - Date.parse(iso)) / 1000) | 0;
    if (s < 60) return s + " s";
    if (s < 3600) return ((s / 60) | 0) + " min";
    if (s < 86400) return ((s / 3600) | 0) + " h";
    return ((s / 86400) | 0) + " d";
  };
  const tickAges = () => $$(".age time").forEach((t) => (t.textContent = ago(t.dateTime)));

  // Fetches this page again and hands over the parsed document.
  const fresh = async () => {
    const r = await fetch(location.href, { headers: { Accept: "text/html" }, cache: "no-store" });
    if (!r.ok) throw new Error("HTTP " + r.status);
    return new DOMParser().parseFromString(await r.text(), "text/html");
  };

  // ---- the list -----------------------------------------------------------------------
  const list = $("#task-list");
  if (list) {
    const search = $("#search");
    const applySearch = () => {
      const q = (search?.value || "").trim().toLowerCase();
      $$("li[data-search]", list).forEach((li) => (li.hidden = q !== "" && !li.dataset.search.includes(q)));
    };
    search?.addEventListener("input", applySearch);
    $("#status-filter")?.addEventListener("change", (e) => e.target.form.requestSubmit());
    setInterval(async () => {
      if (document.hidden) return;
      try {
        const next = $("#task-list", await fresh());
        if (next) { list.innerHTML = next.innerHTML; applySearch(); }
      } catch (_) { /* a missed refresh is retried on the next tick */ }
    }, 3000);
  }
  setInterval(tickAges, 15000);

  // ---- one task ---------------------------------------------------------------------
  const task = $("#task");
  if (!task) return;
  const id = task.dataset.task;
  let last = +task.dataset.last || 0;
  let source = null;
  const events = $("#events");
  const dot = $(".live-dot");
  // Sections the server re-renders on every status change; the event list only grows.
  const parts = ["#head", "#timeline", "#candidates", "#conversation", "#summary", "#diff", "#transcript"];

  // The status the stream announced last. The record may lag its event by a moment, so a
  // refresh that still shows an older status (or fails) is tried again, a few times.
  let want = null;
  let refreshing = null, again = false;
  const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
  const refresh = async () => {
    if (refreshing) { again = true; return refreshing; }
    refreshing = (async () => {
      let tries = 0;
      do {
        again = false;
        try {
          const doc = await fresh();
          for (const sel of parts) {
            const now = $(sel), next = $(sel, doc);
            if (now && next) now.replaceWith(document.adoptNode(next));
          }
          const root = $("#task", doc);
          if (root) task.dataset.terminal = root.dataset.terminal;
          document.title = doc.title;
          bindActions();
          if (want && $("#head .badge")?.dataset.status !== want && ++tries < 20) {
            await sleep(500);
            again = true;
          }
        } catch (_) {
          if (++tries < 20) { await sleep(1000); again = true; }
        }
      } while (again);
      refreshing = null;
    })();
    return refreshing;
  };

  const clock = (iso) => {
    const t = document.createElement("time");
    t.dateTime = iso;
    t.textContent = new Date(iso).toISOString().slice(11, 19);
    return t;
  };

  const follow = () => {
    if (source || !window.EventSource) return;
    source = new EventSource(`/api/tasks/${encodeURIComponent(id)}/events?after=${last}`);
    if (dot) dot.hidden = false;
    const seen = (ev) => {
      const e = JSON.parse(ev.data);
      if (e.seq <= last) return null;
      last = e.seq;
      return e;
    };
    source.addEventListener("agent", (ev) => {
      const e = seen(ev);
      if (!e || !events) return;
      const li = document.createElement("li");
      li.append(clock(e.at), " " + e.message);
      events.append(li);
      events.scrollTop = events.scrollHeight;
    });
    source.addEventListener("status", (ev) => {
      const e = seen(ev);
      if (!e) return;
      want = e.status;
      if (["COMPLETED", "FAILED", "CANCELLED"].includes(e.status)) stop();
      refresh();
    });
    // The server ends the stream when the task ends; the browser would reconnect forever.
    source.addEventListener("error", () => { if (task.dataset.terminal === "1") stop(); });
  };
  const stop = () => {
    source?.close();
    source = null;
    if (dot) dot.hidden = true;
  };

  // Cancel, Retry, a follow-up and Select through the API, staying on the page; the plain
  // form is the fallback.
  function bindActions() {
    $$("form[data-api]").forEach((form) => {
      if (form.dataset.bound) return;
      form.dataset.bound = "1";
      form.addEventListener("submit", async (e) => {
        e.preventDefault();
        const button = $("button", form);
        button.disabled = true;
        // The form's own fields as the API's body: a retry's mode, a follow-up's
        // message, the candidate to select.
        const el = form.elements, body = {};
        if (el.mode) body.mode = el.mode.value;
        if (el.message) body.message = el.message.value;
        if (el.candidate) body.candidate = Number(el.candidate.value);
        try {
          const r = await fetch(form.dataset.api, {
            method: "POST",
            headers: { "Content-Type": "application/json", "X-CSRF-Token": el.csrf?.value || "" },
            body: JSON.stringify(body),
          });
          if (!r.ok) {
            const body = await r.json().catch(() => ({}));
            throw new Error(body.message || "HTTP " + r.status);
          }
          $("#flash").hidden = true;
          task.dataset.terminal = "0";
          want = null;
          await refresh();
          follow();
        } catch (err) {
          const flash = $("#flash");
          flash.textContent = err.message;
          flash.hidden = false;
          button.disabled = false;
        }
      });
    });
  }
  bindActions();
  if (task.dataset.terminal !== "1") follow();
})();
