// Write a whole conversation: "+ Add a turn" appends a turn whose role alternates.
(function () {
  const turns = document.getElementById("turns");
  document.getElementById("add-turn").addEventListener("click", () => {
    const all = turns.querySelectorAll(".turn");
    const last = all[all.length - 1];
    const turn = last.cloneNode(true);
    const n = all.length + 1;
    const prev = last.querySelector("select").value;
    turn.querySelector("select").value = prev === "user" ? "assistant" : "user";
    turn.querySelector("select").setAttribute("aria-label", "role of turn " + n);
    const ta = turn.querySelector("textarea");
    ta.value = "";
    ta.setAttribute("aria-label", "turn " + n);
    ta.placeholder = turn.querySelector("select").value === "user" ? "The user's message" : "The assistant's reply";
    turns.appendChild(turn);
    ta.focus();
  });
})();
