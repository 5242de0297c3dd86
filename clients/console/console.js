// The ftaas console: a client of the API like the SDK, in the browser. Views by the URL's
// hash (#/jobs, #/jobs/ID, #/files, #/playground); everything a user or the server wrote
// is put on the page as text (textContent), never as HTML.

const KEY = "ftaas.apiKey"; // sessionStorage: gone when the tab closes
const POLL_MS = 2000;
const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);
const SVG = "http://www.w3.org/2000/svg";
const MAX_DOTS = 60; // per series; beyond, the line alone
const JOBS_SHOWN = 100;
// Which metrics go on which chart, in OpenAI's names (service/fine_tuning/events.py).
const CHARTS = {
  "loss-chart": ["train_loss", "valid_loss", "full_valid_loss"],
  "reward-chart": ["train_reward_mean", "valid_reward_mean"],
};

const $ = (id) => document.getElementById(id);
let stopPolling = () => {};

function signedIn() {
  return sessionStorage.getItem(KEY) !== null;
}

function headers(extra = {}) {
  const key = sessionStorage.getItem(KEY);
  return key ? { ...extra, Authorization: `Bearer ${key}` } : extra;
}

class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

// A request to the API; an answer that is not 2xx throws with OpenAI's error message.
async function api(path, options = {}) {
  const response = await fetch(`/v1${path}`, { ...options, headers: headers(options.headers) });
  if (!response.ok) {
    let message = `${response.status} ${response.statusText}`;
    try {
      message = (await response.json()).error.message || message;
    } catch {
      // not OpenAI's envelope (a proxy's page): the status says enough
    }
    throw new ApiError(response.status, message);
  }
  return response.json();
}

function say(message) {
  const alert = $("alert");
  alert.textContent = message;
  alert.hidden = !message;
}

function failed(error) {
  if (error instanceof ApiError && error.status === 401) {
    sessionStorage.removeItem(KEY);
    say("That API key is not valid here. Sign in again.");
    location.hash = "#/sign-in";
    return;
  }
  say(error.message || String(error));
}

function element(tag, text, attributes = {}) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  for (const [name, value] of Object.entries(attributes)) node.setAttribute(name, value);
  return node;
}

function row(cells) {
  const tr = document.createElement("tr");
  for (const cell of cells) {
    const td = document.createElement("td");
    if (cell instanceof Node) td.append(cell);
    else td.textContent = cell ?? "";
    tr.append(td);
  }
  return tr;
}

function when(seconds) {
  return seconds ? new Date(seconds * 1000).toLocaleString() : "";
}

function number(value, digits = 4) {
  return typeof value === "number" ? value.toFixed(digits) : "";
}

// Every item of a list endpoint, following `after` while it says there is more.
async function everything(path, limit) {
  const items = [];
  let after = null;
  for (;;) {
    const query = new URLSearchParams({ limit: String(limit) });
    if (after) query.set("after", after);
    const page = await api(`${path}?${query}`);
    items.push(...page.data);
    if (!page.has_more || page.data.length === 0) return items;
    after = page.data[page.data.length - 1].id;
  }
}

// Calls `load` now and every POLL_MS until it returns false or the view changes.
function poll(load) {
  stopPolling();
  let timer = null;
  let live = true;
  const tick = async () => {
    let again = false;
    try {
      again = await load();
    } catch (error) {
      failed(error);
      again = signedIn();
    }
    if (live && again) timer = setTimeout(tick, POLL_MS);
  };
  stopPolling = () => {
    live = false;
    clearTimeout(timer);
  };
  tick();
}

// ---- jobs ------------------------------------------------------------------------------

async function showJobs() {
  poll(async () => {
    // The newest 100 (polled while any runs: not the whole history every 2 s).
    const page = await api(`/fine_tuning/jobs?limit=${JOBS_SHOWN}`);
    const jobs = page.data;
    $("jobs-more").hidden = !page.has_more;
    const rows = jobs.map((job) => {
      const link = element("a", job.id, { href: `#/jobs/${encodeURIComponent(job.id)}` });
      const status = element("span", job.status, { class: `status ${job.status}` });
      return row([
        link,
        job.model,
        job.method?.type ?? "supervised",
        status,
        job.fine_tuned_model ?? "",
        when(job.created_at),
      ]);
    });
    $("jobs-rows").replaceChildren(...rows);
    $("jobs-empty").hidden = jobs.length > 0;
    return jobs.some((job) => !TERMINAL.has(job.status));
  });
}

// An axis label in a few characters (losses span orders of magnitude).
function tick(value) {
  const size = Math.abs(value);
  return size !== 0 && (size < 1e-2 || size >= 1e4) ? value.toExponential(1) : String(+value.toPrecision(3));
}

// A line chart of `series` (name → [[step, value]]), drawn as SVG.
function drawChart(figure, series) {
  const width = 480;
  const height = 220;
  const pad = { left: 52, right: 12, top: 12, bottom: 28 };
  const points = Object.values(series).flat();
  figure.hidden = points.length === 0;
  figure.querySelector("svg")?.remove();
  figure.querySelector(".legend")?.remove();
  if (points.length === 0) return;
  const steps = points.map((p) => p[0]);
  const values = points.map((p) => p[1]);
  const [x0, x1] = [Math.min(...steps), Math.max(...steps, Math.min(...steps) + 1)];
  let [y0, y1] = [Math.min(...values), Math.max(...values)];
  if (y1 - y0 < 1e-9) [y0, y1] = [y0 - 0.5, y1 + 0.5];
  const x = (step) => pad.left + ((step - x0) / (x1 - x0)) * (width - pad.left - pad.right);
  const y = (value) => pad.top + (1 - (value - y0) / (y1 - y0)) * (height - pad.top - pad.bottom);

  const svg = document.createElementNS(SVG, "svg");
  svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
  svg.setAttribute("role", "img");
  const text = (content, attributes) => {
    const node = document.createElementNS(SVG, "text");
    node.textContent = content;
    for (const [name, value] of Object.entries(attributes)) node.setAttribute(name, value);
    svg.append(node);
  };
  const axes = document.createElementNS(SVG, "path");
  axes.setAttribute(
    "d",
    `M${pad.left},${pad.top} V${height - pad.bottom} H${width - pad.right}`,
  );
  axes.setAttribute("class", "axes");
  svg.append(axes);
  text(tick(y1), { x: pad.left - 4, y: pad.top + 4, class: "tick end" });
  text(tick(y0), { x: pad.left - 4, y: height - pad.bottom, class: "tick end" });
  text(`step ${x0}`, { x: pad.left, y: height - 8, class: "tick" });
  text(`step ${x1}`, { x: width - pad.right, y: height - 8, class: "tick end" });

  const legend = element("ul", null, { class: "legend" });
  Object.entries(series).forEach(([name, data], index) => {
    if (data.length === 0) return;
    const line = document.createElementNS(SVG, "polyline");
    line.setAttribute("points", data.map(([s, v]) => `${x(s)},${y(v)}`).join(" "));
    line.setAttribute("class", `series series-${index}`);
    line.dataset.series = name;
    line.dataset.points = String(data.length);
    svg.append(line);
    if (data.length <= MAX_DOTS) {
      // Dots show each measurement (and a lone first one, which has no line yet).
      for (const [step, value] of data) {
        const dot = document.createElementNS(SVG, "circle");
        dot.setAttribute("cx", x(step));
        dot.setAttribute("cy", y(value));
        dot.setAttribute("r", "2.5");
        dot.setAttribute("class", `dot series-${index}`);
        svg.append(dot);
      }
    }
    const last = data[data.length - 1][1];
    legend.append(element("li", `${name}: ${number(last)}`, { class: `series-${index}` }));
  });
  figure.append(svg, legend);
}

function showJob(id) {
  const path = `/fine_tuning/jobs/${encodeURIComponent(id)}`;
  let events = []; // newest first, in the API's order (the order they were written)
  const known = new Set();
  poll(async () => {
    const job = await api(path);
    // Pages newest first, until one holds an event already shown.
    const fresh = [];
    let after = null;
    for (let more = true; more; ) {
      const query = new URLSearchParams({ limit: "1000" });
      if (after) query.set("after", after);
      const page = await api(`${path}/events?${query}`);
      const unseen = page.data.filter((event) => !known.has(event.id));
      fresh.push(...unseen);
      more = page.has_more && unseen.length === page.data.length && page.data.length > 0;
      if (more) after = page.data[page.data.length - 1].id;
    }
    fresh.forEach((event) => known.add(event.id));
    events = fresh.concat(events);
    const checkpoints = await everything(`${path}/checkpoints`, 100);
    renderJob(job, events, checkpoints);
    return !TERMINAL.has(job.status);
  });
}

function renderJob(job, events, checkpoints) {
  $("job-title").textContent = job.id;
  const facts = {
    Status: job.status,
    "Base model": job.model,
    Method: job.method?.type ?? "supervised",
    "Tuned model": job.fine_tuned_model ?? "",
    "Training file": job.training_file,
    "Validation file": job.validation_file ?? "",
    "Trained tokens": job.trained_tokens ?? "",
    Created: when(job.created_at),
    Finished: when(job.finished_at),
  };
  $("job-facts").replaceChildren(
    ...Object.entries(facts).flatMap(([name, value]) => [
      element("dt", name),
      element("dd", value, name === "Status" ? { id: "job-status", class: `status ${value}` } : {}),
    ]),
  );
  $("job-error").hidden = !job.error;
  $("job-error").textContent = job.error ? `${job.error.code}: ${job.error.message}` : "";
  $("job-pause").hidden = job.status !== "running";
  $("job-resume").hidden = job.status !== "paused";
  $("job-cancel").hidden = TERMINAL.has(job.status);
  const playground = $("job-playground");
  playground.hidden = !job.fine_tuned_model;
  if (job.fine_tuned_model) {
    const query = new URLSearchParams({ left: job.model, right: job.fine_tuned_model });
    playground.href = `#/playground?${query}`;
  }

  const metrics = events.filter((event) => event.type === "metrics" && event.data);
  for (const [chart, names] of Object.entries(CHARTS)) {
    const series = {};
    for (const name of names) {
      series[name] = metrics
        .filter((event) => typeof event.data[name] === "number")
        .map((event) => [event.data.step, event.data[name]])
        .sort((a, b) => a[0] - b[0]);
    }
    drawChart($(chart), series);
  }

  $("checkpoint-rows").replaceChildren(
    ...checkpoints.map((checkpoint) =>
      row([
        checkpoint.step_number,
        checkpoint.fine_tuned_model_checkpoint,
        number(checkpoint.metrics?.train_loss),
        number(checkpoint.metrics?.valid_loss ?? checkpoint.metrics?.full_valid_loss),
      ]),
    ),
  );
  $("checkpoints-empty").hidden = checkpoints.length > 0;
  $("events").replaceChildren(
    ...events.map((event) => {
      const item = element("li", null, { class: `event ${event.level}` });
      item.append(element("time", when(event.created_at)), element("span", event.message));
      return item;
    }),
  );
}

async function jobAction(action) {
  const id = $("job-title").textContent;
  try {
    await api(`/fine_tuning/jobs/${encodeURIComponent(id)}/${action}`, { method: "POST" });
    say("");
    showJob(id);
  } catch (error) {
    failed(error);
  }
}

// ---- files -----------------------------------------------------------------------------

async function showFiles() {
  stopPolling();
  const files = await everything("/files", 100);
  $("files-rows").replaceChildren(
    ...files.map((file) => {
      const remove = element("button", "Delete", { type: "button", class: "delete" });
      remove.addEventListener("click", async () => {
        try {
          await api(`/files/${encodeURIComponent(file.id)}`, { method: "DELETE" });
          await showFiles();
        } catch (error) {
          failed(error);
        }
      });
      return row([file.id, file.filename, file.purpose, file.bytes, when(file.created_at), remove]);
    }),
  );
  $("files-empty").hidden = files.length > 0;
}

async function upload(event) {
  event.preventDefault();
  const chosen = $("upload-file").files[0];
  if (!chosen) return;
  const form = new FormData();
  form.append("purpose", $("upload-purpose").value);
  form.append("file", chosen, chosen.name);
  try {
    const file = await api("/files", { method: "POST", body: form });
    say(`Uploaded ${file.filename} as ${file.id}.`);
    $("upload-form").reset();
    await showFiles();
  } catch (error) {
    failed(error);
  }
}

// ---- playground ------------------------------------------------------------------------

let abortAnswers = null;

async function showPlayground(query) {
  stopPolling();
  const models = (await api("/models")).data.map((model) => model.id);
  const choose = (select, wanted, fallback) => {
    select.replaceChildren(...models.map((id) => element("option", id, { value: id })));
    select.value = models.includes(wanted) ? wanted : fallback;
  };
  const tuned = models.find((id) => id.startsWith("ft:")) ?? models[0];
  choose($("left-model"), query.get("left"), models[0]);
  choose($("right-model"), query.get("right"), tuned);
}

// One model's answer, streamed into its pane as it comes.
async function stream(pane, model, prompt, options, signal) {
  const text = pane.querySelector(".answer-text");
  const status = pane.querySelector(".answer-status");
  pane.querySelector(".answer-model").textContent = model;
  text.textContent = "";
  status.textContent = "waiting…";
  pane.dataset.state = "streaming";
  const started = performance.now();
  let firstToken = null;
  let finish = null;
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST",
      headers: headers({ "Content-Type": "application/json" }),
      body: JSON.stringify({
        model,
        messages: [{ role: "user", content: prompt }],
        stream: true,
        ...options,
      }),
      signal,
    });
    if (!response.ok) {
      const body = await response.json().catch(() => ({}));
      throw new ApiError(response.status, body.error?.message ?? `${response.status}`);
    }
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += value;
      const blocks = buffer.split("\n\n");
      buffer = blocks.pop();
      for (const block of blocks) {
        for (const line of block.split("\n")) {
          if (!line.startsWith("data: ")) continue;
          const data = line.slice(6);
          if (data === "[DONE]") continue;
          const chunk = JSON.parse(data);
          if (chunk.error) throw new Error(chunk.error.message);
          const choice = chunk.choices?.[0];
          if (choice?.delta?.content) {
            firstToken ??= performance.now();
            text.textContent += choice.delta.content;
          }
          if (choice?.finish_reason) finish = choice.finish_reason;
        }
      }
    }
    const seconds = ((performance.now() - started) / 1000).toFixed(2);
    const ttft = firstToken ? ((firstToken - started) / 1000).toFixed(2) : "–";
    status.textContent = `${finish ?? "done"} · first token ${ttft} s · ${seconds} s`;
    pane.dataset.state = "done";
  } catch (error) {
    status.textContent = signal.aborted ? "stopped" : `error: ${error.message}`;
    pane.dataset.state = signal.aborted ? "stopped" : "error";
    if (error instanceof ApiError && error.status === 401) failed(error);
  }
}

async function ask(event) {
  event.preventDefault();
  abortAnswers?.abort();
  const controller = new AbortController();
  abortAnswers = controller;
  const options = {
    max_tokens: Number($("max-tokens").value) || 128,
    temperature: Number($("temperature").value) || 0,
  };
  const prompt = $("prompt").value;
  $("send").disabled = true;
  $("stop").hidden = false;
  await Promise.all([
    stream($("left-answer"), $("left-model").value, prompt, options, controller.signal),
    stream($("right-answer"), $("right-model").value, prompt, options, controller.signal),
  ]);
  $("send").disabled = false;
  $("stop").hidden = true;
}

// ---- sign-in and routing ---------------------------------------------------------------

async function signIn(event) {
  event.preventDefault();
  sessionStorage.setItem(KEY, $("api-key").value.trim());
  try {
    await api("/models"); // any key-checked request: a wrong key is a 401
    $("api-key").value = "";
    say("");
    location.hash = "#/jobs";
  } catch (error) {
    failed(error);
  }
}

const VIEWS = ["sign-in", "jobs", "job", "files", "playground"];

async function route() {
  const [path, search] = location.hash.replace(/^#\/?/, "").split("?");
  const [view, id] = path.split("/");
  const name = !signedIn() ? "sign-in" : view === "jobs" && id ? "job" : view || "jobs";
  const shown = VIEWS.includes(name) ? name : "jobs";
  for (const section of VIEWS) $(section).hidden = section !== shown;
  $("nav").hidden = shown === "sign-in";
  for (const link of document.querySelectorAll("#nav a")) {
    link.classList.toggle("current", link.dataset.view === (shown === "job" ? "jobs" : shown));
  }
  stopPolling();
  try {
    if (shown === "jobs") await showJobs();
    if (shown === "job") showJob(decodeURIComponent(id));
    if (shown === "files") await showFiles();
    if (shown === "playground") await showPlayground(new URLSearchParams(search ?? ""));
  } catch (error) {
    failed(error);
  }
}

$("sign-in-form").addEventListener("submit", signIn);
$("sign-out").addEventListener("click", () => {
  sessionStorage.removeItem(KEY);
  stopPolling();
  location.hash = "#/sign-in";
});
$("upload-form").addEventListener("submit", upload);
$("playground-form").addEventListener("submit", ask);
$("stop").addEventListener("click", () => abortAnswers?.abort());
$("job-pause").addEventListener("click", () => jobAction("pause"));
$("job-resume").addEventListener("click", () => jobAction("resume"));
$("job-cancel").addEventListener("click", () => jobAction("cancel"));
window.addEventListener("hashchange", route);
route();
