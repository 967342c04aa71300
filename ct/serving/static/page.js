// The page of the prediction service: send the chosen or dropped image to POST /predict and
// show the top 3 classes with their probabilities and the model that answered. Served as a
// file of its own: the page's Content-Security-Policy runs no inline script.
"use strict";

const $ = (id) => document.getElementById(id);

function showError(text) {
  $("error").textContent = text;
  $("error").hidden = false;
  $("status").textContent = "";
}

async function showModel() {
  try {
    const reply = await fetch("/model", { cache: "no-store" });
    const body = await reply.json();
    if (body.model) {
      $("model-id").textContent = body.model.id;
      $("model-accuracy").textContent =
        body.model.accuracy == null ? "" : `(${body.model.accuracy}% on the test set)`;
    } else {
      $("model-id").textContent = "none yet";
    }
  } catch (err) {
    $("model-id").textContent = "unknown";
  }
}

function showAnswer(body) {
  const answer = body.predictions[0];
  $("answer").textContent = `${answer.class} (${(answer.probability * 100).toFixed(1)}%)`;
  const list = $("top3");
  list.replaceChildren();
  for (const entry of answer.top3) {
    const item = document.createElement("li");
    const name = document.createElement("span");
    name.className = "name";
    name.textContent = entry.class;
    const bar = document.createElement("progress");
    bar.max = 1;
    bar.value = entry.probability;
    const share = document.createElement("span");
    share.className = "probability";
    share.textContent = `${(entry.probability * 100).toFixed(1)}%`;
    item.append(name, bar, share);
    list.append(item);
  }
  $("answered-by").textContent = body.model;
  $("result").hidden = false;
  $("status").textContent = "";
}

async function classify(file) {
  $("error").hidden = true;
  $("status").textContent = `Classifying ${file.name}…`;
  const preview = $("preview");
  if (preview.src.startsWith("blob:")) URL.revokeObjectURL(preview.src);
  preview.src = URL.createObjectURL(file);
  try {
    const reply = await fetch("/predict", {
      method: "POST",
      headers: { "Content-Type": file.type || "application/octet-stream" },
      body: file,
    });
    const body = await reply.json();
    if (!reply.ok) {
      $("result").hidden = true;
      showError(body.error || `the service answered ${reply.status}`);
      return;
    }
    showAnswer(body);
    showModel();
  } catch (err) {
    showError(`the service did not answer: ${err}`);
  }
}

function setUp() {
  const drop = $("drop");
  $("file").addEventListener("change", (event) => {
    if (event.target.files.length) classify(event.target.files[0]);
  });
  drop.addEventListener("dragover", (event) => {
    event.preventDefault();
    drop.classList.add("over");
  });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    if (event.dataTransfer.files.length) classify(event.dataTransfer.files[0]);
  });
  showModel();
}

document.addEventListener("DOMContentLoaded", setUp);
