// The room page's sidebar: the user's rooms with unread and mention badges,
// message search, and browser notifications of mentions and direct messages.
//
// It reads the frames chat.js receives (the chat:frame event) and sends on its
// socket through window.chatsite (chat.js): `rooms` on every (re)connect, a
// `join` of each other room in the list so their messages arrive live, and
// `search`. Its refs start with "page-", which chat.js leaves to it.
//
// Each join counts against the user's rate limit for database frames
// (CHAT_RATE_LIMIT, 60 in 10 s by default, across all their sockets): the
// first rooms of the list are joined at once, the others one at a time, so
// most of the budget stays with what the user does. A `rate_limited` join
// stops the joining until its `retry_after` has passed (the server refuses the
// socket's database frames until then, and closes a socket refused ten times
// in a row), then it is tried again.
//
// Counts are the server's: `rooms`, `joined` and `read_marker` set them; a live
// message from someone else adds one (a mention of me one more) only when its
// seq is above the room's last seq the counts were taken at, so nothing counts
// twice. Anything harder (a deletion, a new direct room, a removal) asks
// `rooms` again.
//
// User-typed text only ever reaches the page through textContent.
(() => {
  "use strict";

  const nav = document.getElementById("room-sidebar");
  if (!nav) return;
  const config = JSON.parse(document.getElementById("chat-config").textContent);
  const ROOM = config.room;
  const ME = config.username;

  const JOINS_AT_ONCE = 25; // the first rooms of the list, joined right away
  const JOIN_PACE_MS = 500; // then one more room every this: 20 joins in 10 s
  const REFRESH_MS = 250;
  const SEARCH_PAGE = 20;
  const NOTIFY_BODY_MAX = 140;
  const BASE_TITLE = document.title.replace(/^\(\d+\) /, "");

  // --- the socket: chat.js's ---------------------------------------------------

  let handle = () => {}; // set below: what to do with a frame

  function sharedLink(page) {
    document.addEventListener("chat:frame", (event) => handle(event.detail));
    return { send: (frame) => page.send(frame), nextRef: (kind) => page.nextRef(kind) };
  }

  // --- state -----------------------------------------------------------------

  const rooms = new Map(); // slug -> entry of the `rooms` frame, kept live
  let order = []; // slugs, most recent activity first
  let loaded = false;
  const joinedHere = new Set(); // other rooms this socket joined (or asked to)
  const unjoinable = new Set(); // other rooms whose join was refused for good
  let joinTimer = null; // the next paced join
  let joinsPausedUntil = 0; // Date.now() before which no join goes (rate_limited)
  const refs = new Map(); // our ref -> {kind, ...}
  const notified = new Set(); // message ids a notification was raised for
  let refreshTimer = null;
  let search = null; // {query, ref, results} while results are shown

  // --- the DOM -----------------------------------------------------------------

  function el(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  const toggle = el("button", "sidebar-toggle", "Rooms");
  toggle.type = "button";
  toggle.setAttribute("aria-expanded", "false");
  toggle.setAttribute("aria-controls", "sidebar-panel");
  const toggleCount = el("span", "sidebar-toggle-count");
  toggleCount.hidden = true;
  toggle.append(toggleCount);

  const panel = el("div", "sidebar-panel");
  panel.id = "sidebar-panel";

  const searchBox = el("div", "sidebar-search");
  searchBox.setAttribute("role", "search");
  const searchLabel = el("label", "sidebar-search-label", "Search messages");
  searchLabel.htmlFor = "sidebar-search-input";
  const searchInput = el("input", "sidebar-search-input");
  searchInput.type = "search";
  searchInput.id = "sidebar-search-input";
  searchInput.maxLength = 200;
  searchInput.placeholder = "Search…";
  searchInput.autocomplete = "off";
  searchBox.append(searchLabel, searchInput);

  const notifyButton = el("button", "sidebar-notify", "Enable notifications");
  notifyButton.type = "button";
  notifyButton.hidden = true;

  const roomsSection = el("section", "sidebar-rooms");
  const roomsHeading = el("h2", "sidebar-heading", "Rooms");
  roomsHeading.id = "sidebar-rooms-heading";
  const roomList = el("ul", "sidebar-room-list");
  roomList.setAttribute("aria-labelledby", roomsHeading.id);
  const roomsEmpty = el("p", "sidebar-empty", "Loading…");
  roomsSection.append(roomsHeading, roomList, roomsEmpty);

  const resultsSection = el("section", "sidebar-results");
  resultsSection.hidden = true;
  const resultsHeading = el("h2", "sidebar-heading", "Search results");
  const resultsStatus = el("p", "sidebar-results-status");
  resultsStatus.setAttribute("role", "status");
  const resultList = el("ol", "sidebar-result-list");
  const moreButton = el("button", "sidebar-more", "More");
  moreButton.type = "button";
  moreButton.hidden = true;
  resultsSection.append(resultsHeading, resultsStatus, resultList, moreButton);

  panel.append(searchBox, notifyButton, roomsSection, resultsSection);
  nav.replaceChildren(toggle, panel);

  toggle.addEventListener("click", () => {
    const open = !nav.classList.contains("open");
    nav.classList.toggle("open", open);
    toggle.setAttribute("aria-expanded", String(open));
  });

  // --- the room list -----------------------------------------------------------

  function displayName(entry) {
    if (!entry) return null;
    if (entry.is_direct) {
      const names = String(entry.title || "").split(" & ");
      const other = names.find((name) => name !== ME);
      if (names.length === 2 && other) return other;
    }
    return entry.title || entry.room;
  }

  function roomName(slug) {
    return displayName(rooms.get(slug)) || slug;
  }

  function countsText(unread, mentions) {
    const parts = [];
    if (unread) parts.push(`${unread} unread`);
    if (mentions) parts.push(`${mentions} mention${mentions === 1 ? "" : "s"}`);
    return parts.join(", ");
  }

  function renderRooms() {
    const items = order.map((slug) => {
      const entry = rooms.get(slug);
      const item = el("li", "sidebar-item");
      const anchor = el("a", "sidebar-room");
      anchor.href = `/r/${encodeURIComponent(slug)}/`;
      anchor.dataset.room = slug;
      if (entry.is_direct) anchor.classList.add("direct");
      if (entry.is_private && !entry.is_direct) anchor.classList.add("private");
      if (slug === ROOM) anchor.setAttribute("aria-current", "page");
      anchor.append(el("span", "sidebar-room-name", displayName(entry)));
      const unread = entry.unread || 0;
      const mentions = entry.mentions || 0;
      if (unread) {
        const badge = el("span", "badge-unread", String(unread));
        badge.setAttribute("aria-hidden", "true");
        anchor.append(badge);
        anchor.classList.add("has-unread");
      }
      if (mentions) {
        const badge = el("span", "badge-mention", `@${mentions}`);
        badge.setAttribute("aria-hidden", "true");
        anchor.append(badge);
      }
      const text = countsText(unread, mentions);
      if (text) anchor.append(el("span", "sidebar-counts", text));
      item.append(anchor);
      return item;
    });
    roomList.replaceChildren(...items);
    roomsEmpty.textContent = loaded ? "No rooms yet." : "Loading…";
    roomsEmpty.hidden = items.length > 0;
    renderTitle();
  }

  function renderTitle() {
    let total = 0;
    for (const entry of rooms.values()) total += entry.unread || 0;
    document.title = total ? `(${total}) ${BASE_TITLE}` : BASE_TITLE;
    toggleCount.textContent = total ? String(total) : "";
    toggleCount.hidden = !total;
  }

  function askRooms() {
    clearTimeout(refreshTimer);
    refreshTimer = null;
    const ref = link.nextRef("rooms");
    refs.set(ref, { kind: "rooms" });
    if (!link.send({ type: "rooms", ref })) refs.delete(ref); // asked again on hello
  }

  function refreshSoon() {
    if (refreshTimer === null) refreshTimer = setTimeout(askRooms, REFRESH_MS);
  }

  function applyRooms(list) {
    rooms.clear();
    order = [];
    for (const entry of list || []) {
      rooms.set(entry.room, { ...entry });
      order.push(entry.room);
    }
    loaded = true;
    unjoinable.clear(); // the server lists them again: worth one more try
    renderRooms();
    joinOthers();
  }

  // Join the other rooms of the list on this socket, so their messages come
  // live: the first JOINS_AT_ONCE now, the rest paced (see the top).
  function joinOthers() {
    if (Date.now() >= joinsPausedUntil) {
      for (const slug of order.slice(0, JOINS_AT_ONCE)) {
        if (wantsJoin(slug)) joinRoom(slug);
      }
    }
    paceJoins();
  }

  function wantsJoin(slug) {
    return slug !== ROOM && !joinedHere.has(slug) && !unjoinable.has(slug);
  }

  function paceJoins() {
    if (joinTimer !== null || !order.some(wantsJoin)) return;
    const wait = Math.max(JOIN_PACE_MS, joinsPausedUntil - Date.now());
    joinTimer = setTimeout(() => {
      joinTimer = null;
      if (Date.now() < joinsPausedUntil) {
        paceJoins();
        return;
      }
      const slug = order.find(wantsJoin);
      // Not sent: the socket is down, and its next hello starts over.
      if (slug !== undefined && joinRoom(slug)) paceJoins();
    }, wait);
  }

  function stopJoins() {
    clearTimeout(joinTimer);
    joinTimer = null;
    joinsPausedUntil = 0;
    joinedHere.clear();
    unjoinable.clear();
  }

  function joinRoom(slug) {
    const ref = link.nextRef("join");
    refs.set(ref, { kind: "join", room: slug });
    if (link.send({ type: "join", room: slug, ref })) {
      joinedHere.add(slug);
      return true;
    }
    refs.delete(ref);
    return false;
  }

  function moveToTop(slug) {
    order = [slug, ...order.filter((s) => s !== slug)];
  }

  // --- frames --------------------------------------------------------------------

  function onMessage(message) {
    const slug = message.room;
    const fromOther = message.user && message.user.username !== ME;
    const entry = rooms.get(slug);
    if (!entry) {
      // A new direct conversation (they reach us without a join): ask the list.
      refreshSoon();
      if (fromOther && slug.startsWith("dm-")) notify("direct", slug, message);
      return;
    }
    if (message.seq > (entry.last_seq || 0)) {
      entry.last_seq = message.seq;
      entry.last_message = message;
      const seenHere = slug === ROOM && !document.hidden; // chat.js reads it
      if (fromOther && !message.deleted && !seenHere) {
        entry.unread = (entry.unread || 0) + 1;
        if ((message.mentions || []).includes(ME)) entry.mentions = (entry.mentions || 0) + 1;
      }
      moveToTop(slug);
      renderRooms();
    }
    if (fromOther && entry.is_direct) notify("direct", slug, message);
  }

  handle = (frame) => {
    switch (frame.type) {
      case "hello":
        stopJoins(); // a new socket joined nothing yet
        askRooms();
        break;
      case "rooms":
        if (refs.get(frame.ref)?.kind !== "rooms") break;
        refs.delete(frame.ref);
        applyRooms(frame.rooms);
        break;
      case "joined": {
        refs.delete(frame.ref);
        const entry = rooms.get(frame.room);
        if (!entry || frame.room === ROOM) break;
        joinedHere.add(frame.room);
        entry.unread = frame.unread;
        entry.mentions = frame.mentions;
        entry.last_seq = Math.max(entry.last_seq || 0, frame.last_seq || 0);
        renderRooms();
        break;
      }
      case "message":
        onMessage(frame);
        break;
      case "read_marker": {
        const entry = rooms.get(frame.room);
        if (!entry) {
          refreshSoon();
          break;
        }
        entry.read_seq = frame.seq;
        entry.unread = frame.unread;
        entry.mentions = frame.mentions;
        renderRooms();
        break;
      }
      case "message_deleted":
        if (frame.room !== ROOM) refreshSoon();
        break;
      case "removed":
        if (frame.room !== ROOM) {
          joinedHere.delete(frame.room);
          refreshSoon();
        }
        break;
      case "notification":
        if (frame.kind === "mention" && frame.message) {
          notify("mention", frame.room || frame.message.room, frame.message);
        }
        break;
      case "search":
        onSearch(frame);
        break;
      case "error":
        onError(frame);
        break;
      default:
        break;
    }
  };

  function onError(frame) {
    const request = refs.get(frame.ref);
    if (!request) return;
    refs.delete(frame.ref);
    if (request.kind === "join") {
      joinedHere.delete(request.room);
      if (frame.code === "rate_limited" || frame.code === "unavailable") {
        // Try again, paced, once retry_after has passed.
        const until = Date.now() + (frame.retry_after || 1) * 1000;
        joinsPausedUntil = Math.max(joinsPausedUntil, until);
        clearTimeout(joinTimer);
        joinTimer = null;
        paceJoins();
      } else {
        unjoinable.add(request.room);
      }
    } else if (request.kind === "search" && search && search.ref === frame.ref) {
      resultsStatus.textContent = frame.message || frame.code;
      resultsStatus.classList.add("error");
      moreButton.hidden = true;
    }
  }

  // --- browser notifications ----------------------------------------------------

  function truncate(text, max) {
    const chars = Array.from(text || "");
    return chars.length > max ? `${chars.slice(0, max - 1).join("")}…` : chars.join("");
  }

  function notify(kind, slug, message) {
    if (!document.hidden || !("Notification" in window)) return;
    if (Notification.permission !== "granted" || message.deleted) return;
    if (notified.has(message.id)) return; // a mention in a direct room comes twice
    notified.add(message.id);
    const author = message.user ? message.user.username : "someone";
    // A direct room: who wrote is where (a mention there is a message to me anyway).
    const direct = rooms.get(slug)?.is_direct || slug.startsWith("dm-");
    const title = direct ? `${author} sent you a message` : `${author} mentioned you in ${roomName(slug)}`;
    let shown;
    try {
      shown = new Notification(title, {
        body: truncate(message.body, NOTIFY_BODY_MAX),
        tag: `chatsite-message-${message.id}`, // other tabs raise the same one: shown once
      });
    } catch {
      return; // a browser that allows notifications only from a service worker
    }
    shown.addEventListener("click", () => {
      window.focus();
      shown.close();
      location.assign(`/r/${encodeURIComponent(slug)}/#m${message.seq}`);
    });
  }

  function renderNotifyButton() {
    notifyButton.hidden = !("Notification" in window) || Notification.permission !== "default";
  }

  notifyButton.addEventListener("click", () => {
    const asked = Notification.requestPermission(renderNotifyButton);
    if (asked && typeof asked.then === "function") asked.then(renderNotifyButton, renderNotifyButton);
  });

  // --- search ------------------------------------------------------------------

  function formatWhen(iso) {
    const date = new Date(iso);
    if (Number.isNaN(date.getTime())) return "";
    return date.toLocaleString([], { dateStyle: "short", timeStyle: "short" });
  }

  function showResults(visible) {
    resultsSection.hidden = !visible;
    roomsSection.hidden = visible;
  }

  function runSearch(query, before) {
    const ref = link.nextRef("search");
    refs.set(ref, { kind: "search" });
    const frame = { type: "search", query, limit: SEARCH_PAGE, ref };
    if (before !== undefined) frame.before = before;
    if (before === undefined) {
      search = { query, ref, results: [] };
      resultList.replaceChildren();
    } else {
      search.ref = ref;
    }
    showResults(true);
    resultsStatus.classList.remove("error");
    moreButton.hidden = true;
    if (link.send(frame)) {
      resultsStatus.textContent = "Searching…";
      moreButton.disabled = true;
    } else {
      refs.delete(ref);
      resultsStatus.textContent = "Not connected: try again in a moment.";
      resultsStatus.classList.add("error");
    }
  }

  function resultItem(message) {
    const item = el("li", "search-result");
    const anchor = el("a", "search-result-link");
    anchor.href = `/r/${encodeURIComponent(message.room)}/#m${message.seq}`;
    const meta = el("span", "search-result-meta");
    meta.append(el("span", "search-result-room", roomName(message.room)));
    meta.append(el("span", "search-result-author", message.user ? message.user.username : ""));
    const time = el("time", "search-result-time", formatWhen(message.created_at));
    time.dateTime = message.created_at;
    meta.append(time);
    anchor.append(meta, el("span", "search-result-body", message.body));
    item.append(anchor);
    return item;
  }

  function onSearch(frame) {
    if (refs.get(frame.ref)?.kind !== "search") return;
    refs.delete(frame.ref);
    if (!search || search.ref !== frame.ref) return; // an older search
    const results = frame.results || [];
    search.results.push(...results);
    resultList.append(...results.map(resultItem));
    const count = search.results.length;
    resultsStatus.classList.remove("error");
    resultsStatus.textContent = count
      ? `${count}${frame.has_more ? "+" : ""} result${count === 1 && !frame.has_more ? "" : "s"}`
      : "No messages found.";
    moreButton.hidden = !frame.has_more || !count;
    moreButton.disabled = false;
  }

  function closeSearch() {
    search = null;
    resultList.replaceChildren();
    resultsStatus.textContent = "";
    moreButton.hidden = true;
    showResults(false);
  }

  searchInput.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.isComposing) {
      event.preventDefault();
      const query = searchInput.value.trim();
      if (query) runSearch(query);
      else closeSearch();
    } else if (event.key === "Escape") {
      event.preventDefault();
      searchInput.value = "";
      closeSearch();
    }
  });

  searchInput.addEventListener("input", () => {
    if (searchInput.value === "") closeSearch();
  });

  moreButton.addEventListener("click", () => {
    if (!search || !search.results.length) return;
    runSearch(search.query, search.results[search.results.length - 1].id);
  });

  // --- start --------------------------------------------------------------------

  const page = window.chatsite;
  if (!page || typeof page.send !== "function") {
    // A chat.js that shares no socket: nothing here could work.
    roomsEmpty.textContent = "Your rooms are not available on this page.";
    searchBox.hidden = true;
    return;
  }
  const link = sharedLink(page);
  renderRooms();
  renderNotifyButton();
  // The page's socket may be open already (its hello came before this script ran).
  askRooms();
})();
