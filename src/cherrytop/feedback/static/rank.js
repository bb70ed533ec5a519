// Ranking K answers best to worst: drag (HTML5 drag and drop) or keyboard (Space picks up / drops,
// arrows move, T toggles "tie with the answer above"). On submit, `order` gets the answers' original
// indices top to bottom and `ties` the tied pairs ("i,j;k,l"): every pair inside a run of ties.
(function () {
  const list = document.getElementById("ranklist");
  const live = document.getElementById("live");
  const cards = () => Array.from(list.querySelectorAll(".answer"));
  const letter = (c) => c.querySelector(".letter").textContent;

  function refresh() {
    // places as in sports: a tie shares the place ("2="), the next answer's place counts everyone above
    const cs = cards();
    const groups = [];
    cs.forEach((c, n) => {
      const box = c.querySelector(".tie-box");
      if (n === 0) box.checked = false;
      if (n > 0 && box.checked) groups[groups.length - 1].push(n); else groups.push([n]);
    });
    groups.forEach((g) => g.forEach((n, j) => {
      const c = cs[n];
      c.classList.toggle("tied", j > 0);
      c.classList.toggle("in-tie", g.length > 1);
      c.querySelector(".pos").textContent = (g[0] + 1) + (g.length > 1 ? "=" : "");
    }));
    document.getElementById("order").value = cs.map((c) => c.dataset.index).join(",");
    const pairs = [];
    let group = [];
    cs.forEach((c, n) => {
      if (n > 0 && c.querySelector(".tie-box").checked) group.push(c.dataset.index);
      else group = [c.dataset.index];
      if (group.length > 1) group.slice(0, -1).forEach((g) => pairs.push(g + "," + c.dataset.index));
    });
    document.getElementById("ties").value = pairs.join(";");
  }
  function announce(c) {
    const n = cards().indexOf(c) + 1;
    live.textContent = letter(c) + " is now at position " + n + (c.classList.contains("tied") ? " (tied)" : "");
  }

  // keyboard
  list.addEventListener("keydown", (e) => {
    const c = e.target.closest(".answer");
    if (!c || e.target !== c) return;
    const grabbed = c.classList.contains("grabbed");
    if (e.key === " " || e.key === "Enter") {
      e.preventDefault();
      c.classList.toggle("grabbed");
      c.setAttribute("aria-pressed", c.classList.contains("grabbed"));
      live.textContent = letter(c) + (c.classList.contains("grabbed") ? " picked up" : " dropped");
    } else if (e.key === "Escape" && grabbed) {
      c.classList.remove("grabbed");
    } else if (e.key === "ArrowUp" || e.key === "ArrowDown") {
      e.preventDefault();
      const other = e.key === "ArrowUp" ? c.previousElementSibling : c.nextElementSibling;
      if (!other) return;
      if (grabbed) {
        if (e.key === "ArrowUp") list.insertBefore(c, other); else list.insertBefore(other, c);
        c.focus();
        refresh();
        announce(c);
      } else {
        other.focus();
      }
    } else if (e.key === "t" || e.key === "T") {
      const box = c.querySelector(".tie-box");
      if (cards().indexOf(c) > 0) { box.checked = !box.checked; refresh(); announce(c); }
    }
  });
  list.addEventListener("change", (e) => { if (e.target.classList.contains("tie-box")) refresh(); });

  // drag and drop
  let dragged = null;
  list.addEventListener("dragstart", (e) => {
    dragged = e.target.closest(".answer");
    if (!dragged) return;
    dragged.classList.add("dragging");
    e.dataTransfer.effectAllowed = "move";
    e.dataTransfer.setData("text/plain", dragged.dataset.index);
  });
  list.addEventListener("dragover", (e) => {
    const over = e.target.closest(".answer");
    if (!dragged || !over || over === dragged) { e.preventDefault(); return; }
    e.preventDefault();
    const box = over.getBoundingClientRect();
    const after = e.clientY > box.top + box.height / 2;
    list.insertBefore(dragged, after ? over.nextElementSibling : over);
    refresh();
  });
  list.addEventListener("drop", (e) => { e.preventDefault(); });
  list.addEventListener("dragend", () => {
    if (dragged) { dragged.classList.remove("dragging"); refresh(); announce(dragged); }
    dragged = null;
  });

  document.getElementById("rank-form").addEventListener("submit", refresh);
  refresh();
})();
