// tuneline review page: plain JavaScript, no build step. Every text from the dataset goes into
// the page through textContent or a textarea's value, never as HTML: answers are model output.
"use strict";

const PAGE = 50;
const FIELDS = ["question", "answer", "followup", "followup_answer"];
const state = { offset: 0, rows: [], version: null, matched: 0, focus: 0, edits: new Map(),
                added: [] };
const $ = (id) => document.getElementById(id);
// This session's token, in the page the server served: every save carries it.
const TOKEN = document.querySelector('meta[name="tuneline-token"]').content;

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "text") node.textContent = v;
    else if (k === "class") node.className = v;
    else node.setAttribute(k, v);
  }
  for (const c of children) if (c) node.append(c);
  return node;
}

function query() {
  const p = new URLSearchParams({ offset: state.offset, limit: PAGE });
  if ($("f-split").value) p.set("split", $("f-split").value);
  if ($("f-source").value) p.set("source", $("f-source").value);
  if ($("f-findings").checked) p.set("findings", "1");
  if ($("f-unreviewed").checked) p.set("unreviewed", "1");
  if ($("f-q").value.trim()) p.set("q", $("f-q").value.trim());
  return p;
}

async function load() {
  const res = await fetch("/api/rows?" + query());
  const data = await res.json();
  if (!res.ok) return status(data.error || res.statusText, true);
  Object.assign(state, { rows: data.rows, version: data.version, matched: data.matched });
  state.focus = Math.min(state.focus, Math.max(0, data.rows.length - 1));
  $("progress").textContent = `reviewed ${data.reviewed} / ${data.total}`;
  const notBuilt = data.pending ? `· ${data.pending} saved change(s) not in the dataset yet` : "";
  $("pending-count").textContent = notBuilt;
  fillSources(data.sources);
  const last = Math.min(data.offset + data.rows.length, data.matched);
  $("page").textContent = data.matched ? `${data.offset + 1}–${last} of ${data.matched}` : "no match";
  $("prev").disabled = data.offset === 0;
  $("next").disabled = last >= data.matched;
  render();
}

function fillSources(sources) {
  const select = $("f-source");
  if (select.options.length > 1) return;
  for (const s of sources) select.append(el("option", { text: s, value: s }));
}

function status(message, isError) {
  const box = $("status");
  box.textContent = message;
  box.className = "status " + (isError ? "error" : "ok");
}

// ------------------------------------------------------------------ edits kept until Save

function current(row) {
  return state.edits.get(row.id) || null;
}

function edit(row) {
  let e = state.edits.get(row.id);
  if (!e) {
    e = { id: row.id, action: row.dropped ? "drop" : "", base: row.base, reviewed: null };
    for (const f of FIELDS) e[f] = row[f];
    state.edits.set(row.id, e);
  }
  return e;
}

function changed(row, e) {
  const dropChanged = (e.action === "drop") !== row.dropped;
  const textChanged = FIELDS.some((f) => e[f] !== row[f]);
  return dropChanged || textChanged || (e.reviewed !== null && e.reviewed !== row.reviewed);
}

function settle(row) {
  const e = state.edits.get(row.id);
  if (e && !changed(row, e)) state.edits.delete(row.id);
  updateSaveButton();
}

function updateSaveButton() {
  const n = state.edits.size + state.added.length;
  $("save").disabled = n === 0;
  $("save").textContent = n ? `Save ${n} change${n > 1 ? "s" : ""}` : "Save";
}

function toggleDrop(i) {
  const row = state.rows[i];
  const e = edit(row);
  e.action = e.action === "drop" ? "" : "drop";
  settle(row);
  render();
}

function toggleReviewed(i) {
  const row = state.rows[i];
  if (row.dropped || row.by_expert || !row.answer) return;
  const e = edit(row);
  const now = e.reviewed === null ? row.reviewed : e.reviewed;
  e.reviewed = !now;
  settle(row);
  render();
}

async function save() {
  const edits = [...state.edits.values(), ...state.added];
  if (!edits.length) return;
  const body = { version: state.version, edits: edits.map((e) => {
    if (e.action !== "drop" && e.base && e.base.drop) return { id: e.id, action: "", base: e.base,
      question: e.question };
    return e;
  }) };
  const res = await fetch("/api/save", { method: "POST", body: JSON.stringify(body),
                                         headers: { "Content-Type": "application/json",
                                                    "X-Tuneline-Token": TOKEN } });
  const data = await res.json();
  if (res.status === 409 && data.conflicts) {
    status("Not saved: text you edited was changed meanwhile (another tab or a teammate). " +
           "Both texts are shown on top: choose what to keep, then save again.", true);
    showConflicts(data.conflicts);
    return;
  }
  if (!res.ok) {
    const hint = res.status === 409 ? " Your unsaved edits are kept: press Reload." : "";
    status(`Not saved: ${data.error}${hint}`, true);
    if (res.status === 409) showReload();
    return;
  }
  state.edits.clear();
  state.added = [];
  updateSaveButton();
  const notes = data.notes.length ? " Notes: " + data.notes.join("; ") : "";
  status(`Saved ${data.changed.length} correction line(s) to data/corrections.jsonl.` +
         " Next: dvc repro, then commit and push." + notes, false);
  await load();
}

function showReload() {
  if ($("reload")) return;
  const button = el("button", { id: "reload", type: "button", text: "Reload" });
  button.addEventListener("click", async () => {
    button.remove();
    await load();
    // Every edit is kept, with the base it was made on: where that text changed meanwhile
    // (on this page or not), the server refuses to overwrite it and both texts are shown.
    const moved = state.rows.filter((r) => {
      const e = state.edits.get(r.id);
      return e && JSON.stringify(e.base) !== JSON.stringify(r.base);
    }).map((r) => r.id);
    updateSaveButton();
    render();
    status("Reloaded; your unsaved edits are kept. Save again." + (moved.length ?
      ` Changed meanwhile: ${moved.join(", ")}; saving shows both texts to choose from.` : ""),
           false);
  });
  $("status").after(button);
}

// ------------------------------------------------------------------ conflicts: both texts

const LABELS = { question: "Question", answer: "Answer", followup: "Follow-up",
                 followup_answer: "Follow-up answer" };

function showConflicts(conflicts) {
  let box = $("conflicts");
  if (!box) {
    box = el("section", { id: "conflicts" });
    $("rows").before(box);
  }
  box.replaceChildren(...conflicts.map(conflictCard));
  box.scrollIntoView({ block: "start" });
}

function conflictCard(c) {
  const chosen = {};
  const node = el("div", { class: "card conflict", "data-id": c.id },
    el("div", { class: "meta" }, el("span", { class: "id", text: c.id }),
       el("span", { class: "badge pending", text: "changed since you edited it" })));
  for (const f of c.fields) {
    const merge = el("textarea", { class: "merge", rows: "4" });
    merge.value = c.mine[f];
    const part = el("div", { class: "conflict-field", "data-field": f },
      el("label", { text: `${LABELS[f]}, saved meanwhile (theirs)` }),
      el("pre", { class: "theirs", text: c.theirs[f] }),
      el("label", { text: `${LABELS[f]}, your edit (mine)` }),
      el("pre", { class: "mine", text: c.mine[f] }),
      el("label", { text: "Text to keep (edit it to merge both)" }, merge));
    const pick = (text, how) => {
      chosen[f] = text;
      for (const b of part.querySelectorAll("button")) b.disabled = true;
      merge.disabled = true;
      part.append(el("div", { class: "chosen", text: `Keeping ${how}.` }));
      if (c.fields.every((k) => k in chosen)) resolve(c, chosen, node);
    };
    const button = (cls, text, fn) => {
      const b = el("button", { type: "button", class: cls, text });
      b.addEventListener("click", fn);
      return b;
    };
    part.append(el("div", { class: "actions" },
      button("keep-theirs", "Keep theirs", () => pick(c.theirs[f], "theirs")),
      button("keep-mine", "Keep mine", () => pick(c.mine[f], "mine")),
      button("keep-merged", "Keep the text above", () => pick(merge.value, "the text above"))));
    node.append(part);
  }
  return node;
}

function resolve(c, chosen, node) {
  // A fresh edit on the current text: the chosen cells, the other cells this edit changed,
  // everything else as it is now.
  const old = state.edits.get(c.id);
  const e = { id: c.id, action: "", base: c.base, reviewed: old ? old.reviewed : null };
  for (const f of FIELDS) {
    e[f] = f in chosen ? chosen[f] : c.edited.includes(f) ? c.mine[f] : c.theirs[f];
  }
  if (FIELDS.every((f) => e[f] === c.theirs[f]) && e.reviewed === null) state.edits.delete(c.id);
  else state.edits.set(c.id, e);
  node.remove();
  if (!$("conflicts").children.length) $("conflicts").remove();
  updateSaveButton();
  render();
  status(`${c.id}: your choice is kept; press Save to write it.`, false);
}

// ------------------------------------------------------------------ rendering

function render() {
  const box = $("rows");
  box.replaceChildren(...state.rows.map(card));
  highlight(false);
}

function card(row, i) {
  const e = current(row);
  const dropped = e ? e.action === "drop" : row.dropped;
  const reviewed = e && e.reviewed !== null ? e.reviewed : row.reviewed;
  const node = el("section", { class: "card" + (dropped ? " dropped" : "") + (e ? " edited" : ""),
                               "data-id": row.id, "data-index": String(i) });
  node.append(el("div", { class: "meta" },
    el("span", { class: "id", text: row.id }),
    el("span", { class: "badge", text: row.split }),
    el("span", { class: "badge " + row.source, text: row.source || "?" }),
    el("span", { class: "origin", text: (row.origin || []).join(", ") }),
    el("span", { class: "badge" + (reviewed ? " reviewed" : ""),
                 text: reviewed ? "reviewed" : "not reviewed" }),
    row.pending ? el("span", { class: "badge pending", text: "saved, run dvc repro" }) : null,
    e ? el("span", { class: "badge pending", text: "unsaved" }) : null));
  if (row.findings.length) {
    node.append(el("ul", { class: "findings" }, ...row.findings.map((f) =>
      el("li", { class: f.severity, text: `${f.severity} ${f.check}: ${f.message}` }))));
  }
  for (const f of FIELDS) {
    node.append(field(row, f, dropped));
    const models = f === "answer" ? modelAnswers(row) : null;  // next to the reference
    if (models) node.append(models);
  }
  for (const p of row.pairs || []) node.append(preferencePair(p));
  if (row.more_turns.length) {
    node.append(el("div", { class: "more" }, el("label", { text: "Later turns (edit in data/corrections.jsonl)" }),
      ...row.more_turns.map((t) => el("pre", { text: t }))));
  }
  const drop = el("button", { type: "button", class: "drop", text: dropped ? "Restore (d)" : "Drop (d)" });
  drop.addEventListener("click", () => toggleDrop(i));
  const label = row.by_expert ? "Written by an expert" : reviewed ? "Unmark reviewed (r)" : "Mark reviewed (r)";
  const rev = el("button", { type: "button", class: "review", text: label });
  rev.addEventListener("click", () => toggleReviewed(i));
  if (dropped || row.by_expert || !row.answer) rev.disabled = true;
  if (row.by_expert) rev.title = "an expert wrote every answer of this conversation";
  node.append(el("div", { class: "actions" }, rev, drop));
  node.addEventListener("click", () => { state.focus = i; highlight(false); });
  return node;
}

function modelAnswers(row) {
  if (row.base_answer === null && row.tuned_answer === null) return null;
  const side = (who, cls, text) => el("div", {}, el("label", { text: `${who} model answered` }),
                                      el("pre", { class: cls, text: text || "" }));
  return el("div", { class: "models" }, side("base", "base-answer", row.base_answer),
            side("tuned", "tuned-answer", row.tuned_answer));
}

// What curate learned from a replacement (data/dataset/preference): the expert's answer over
// the generated one it replaced.
function preferencePair(p) {
  const side = (who, cls, text) => el("div", {}, el("label", { text: who }),
                                      el("pre", { class: cls, text }));
  return el("div", { class: "models pair" },
            side(`pair ${p.id}: chosen (expert)`, "pair-chosen", p.chosen),
            side(`rejected (replaced, ${p.generated || "generated"})`, "pair-rejected", p.rejected));
}

function field(row, name, dropped) {
  const labels = { question: "Question", answer: row.split === "test" ? "Answer (reference)" : "Answer",
                   followup: "Follow-up", followup_answer: "Follow-up answer" };
  const e = current(row);
  const text = e ? e[name] : row[name];
  // As tall as the text (within reason), so short rows take little room.
  const lines = text.split("\n").reduce((n, l) => n + 1 + Math.floor(l.length / 110), 0);
  const area = el("textarea", { class: "f-" + name, rows: String(Math.min(14, Math.max(1, lines))) });
  area.value = text;
  area.disabled = dropped;
  area.addEventListener("input", () => {
    edit(row)[name] = area.value;
    settle(row);
    area.closest(".card").classList.toggle("edited", state.edits.has(row.id));
  });
  return el("label", {}, labels[name], area);
}

function highlight(scroll) {
  const cards = [...document.querySelectorAll("#rows .card")];
  cards.forEach((c, i) => c.classList.toggle("focus", i === state.focus));
  if (scroll && cards[state.focus]) cards[state.focus].scrollIntoView({ block: "nearest" });
}

// ------------------------------------------------------------------ controls

function page(delta) {
  const next = state.offset + delta * PAGE;
  if (next < 0 || next >= state.matched) return;
  state.offset = next;
  state.focus = 0;
  load().then(() => window.scrollTo(0, 0));
}

function refilter() {
  state.offset = 0;
  state.focus = 0;
  load();
}

function addConversation() {
  const get = (id) => $(id).value.trim();
  const e = { id: "", action: "", question: get("new-question"), answer: get("new-answer"),
              followup: get("new-followup"), followup_answer: get("new-followup-answer"),
              base: {}, reviewed: null };
  if (!e.question || !e.answer) return status("A new conversation needs a question and an answer.", true);
  state.added.push(e);
  for (const id of ["new-question", "new-answer", "new-followup", "new-followup-answer"]) $(id).value = "";
  updateSaveButton();
  status("Added; press Save to write it.", false);
}

function onKey(ev) {
  if ((ev.ctrlKey || ev.metaKey) && ev.key === "s") { ev.preventDefault(); save(); return; }
  const typing = ["TEXTAREA", "INPUT", "SELECT"].includes(document.activeElement.tagName);
  if (ev.key === "Escape" && typing) { document.activeElement.blur(); return; }
  if (typing || ev.ctrlKey || ev.metaKey || ev.altKey) return;
  const keys = {
    j: () => { state.focus = Math.min(state.focus + 1, state.rows.length - 1); highlight(true); },
    k: () => { state.focus = Math.max(state.focus - 1, 0); highlight(true); },
    n: () => page(1), p: () => page(-1),
    r: () => toggleReviewed(state.focus), d: () => toggleDrop(state.focus),
    e: () => { const a = document.querySelectorAll("#rows .card")[state.focus]; if (a) a.querySelector(".f-answer").focus(); },
    "/": () => $("f-q").focus(),
  };
  if (keys[ev.key] && (state.rows.length || "np/".includes(ev.key))) { ev.preventDefault(); keys[ev.key](); }
}

document.addEventListener("DOMContentLoaded", () => {
  let timer = null;
  $("filters").addEventListener("submit", (ev) => ev.preventDefault());
  for (const id of ["f-split", "f-source", "f-findings", "f-unreviewed"]) $(id).addEventListener("change", refilter);
  $("f-q").addEventListener("input", () => { clearTimeout(timer); timer = setTimeout(refilter, 250); });
  $("prev").addEventListener("click", () => page(-1));
  $("next").addEventListener("click", () => page(1));
  $("save").addEventListener("click", save);
  $("add-button").addEventListener("click", addConversation);
  document.addEventListener("keydown", onKey);
  window.addEventListener("beforeunload", (ev) => {
    if (state.edits.size || state.added.length) { ev.preventDefault(); ev.returnValue = ""; }
  });
  load();
});
