// The page: the connection test (`#/`), the live latency graph (`#/live`)
// and a test's results read back (`#/results/<namespace>/<name>/<token>`).

import "./style.css";
import {
  ApiError,
  type PublicPool,
  type SessionResults,
  type SessionView,
  SessionStreams,
  type ClusterView,
  createSession,
  opened,
  publicPools,
  readSession,
  watchCluster,
} from "./api";
import { LatencyChart } from "./chart";
import { DEFAULT_SETTINGS, type Observer, bufferbloat, household, nowUs } from "./engine";
import { HOUSEHOLD, type HouseholdUser } from "./measure";

/** What the browser tests read back. */
interface Exposed {
  cluster?: ClusterView;
  results?: SessionResults;
  session?: SessionView;
  chart?: LatencyChart;
  heals: Array<{ from: string; to: string; gapMs: number }>;
}
const exposed: Exposed = { heals: [] };
(window as unknown as { tidepool: Exposed }).tidepool = exposed;

type Child = Node | string | undefined | false;

/** An element with attributes and children; text is always text, never HTML. */
function h(tag: string, attributes: Record<string, string> = {}, ...children: Child[]): HTMLElement {
  const element = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) element.setAttribute(name, value);
  for (const child of children) if (child !== undefined && child !== false) element.append(child);
  return element;
}

const app = document.getElementById("app") as HTMLElement;

/** Aborted when the page shows another view: what a view started (timers,
 * sockets, streams) listens for it and stops. */
let leaving = new AbortController();

function show(...children: Child[]) {
  exposed.chart?.stop();
  leaving.abort();
  leaving = new AbortController();
  app.replaceChildren(
    h(
      "header",
      {},
      h("h1", {}, "Tidepool"),
      h(
        "nav",
        {},
        h("a", { href: "#/" }, "Test my connection"),
        h("a", { href: "#/live" }, "Live latency"),
        h("a", { href: "#/cluster" }, "Cluster"),
      ),
    ),
    h("main", {}, ...children),
  );
}

function describe(error: unknown): string {
  if (error instanceof ApiError && error.retryAfterSeconds) {
    const after = error.retryAfterSeconds;
    const when = after < 120 ? `${after} s` : `${Math.ceil(after / 60)} min`;
    // The message may end in its own parenthesis (the limit): a clause reads better.
    return `${error.message}; try again in ${when}`;
  }
  return error instanceof Error ? error.message : String(error);
}

async function firstPool(): Promise<PublicPool> {
  const pools = await publicPools();
  const pool = pools.find((p) => p.warm > 0) ?? pools[0];
  if (!pool) throw new Error("no pool on this cluster is open to anonymous tests");
  return pool;
}

const mbps = (value?: number) => (value === undefined ? "–" : `${value.toFixed(value >= 100 ? 0 : 1)} Mbit/s`);
const ms = (value?: number) => (value === undefined ? "–" : `${value.toFixed(1)} ms`);

/** The grades, the figures and the household's cards (`cards`, when they
 * are live cards still filling in, else the results' own). */
function resultsBlock(results: SessionResults, cards?: HTMLElement): HTMLElement {
  const grades = results.grades ?? {};
  const grade = (label: string, id: string, value?: string) =>
    h("div", { class: "grade" }, h("span", { class: "letter", id }, value ?? "–"), h("span", {}, label));
  const row = (label: string, value: string, id: string) => h("tr", {}, h("th", {}, label), h("td", { id }, value));
  const loaded = results.loadedLatency ?? {};
  return h(
    "section",
    { class: "results", id: "results" },
    h(
      "div",
      { class: "grades" },
      grade("bufferbloat", "grade-bufferbloat", grades.bufferbloat),
      grade("household", "grade-household", grades.household),
      grade("overall", "grade-overall", grades.overall),
    ),
    h(
      "table",
      {},
      row("Idle latency (median)", ms(results.latency?.p50Ms), "idle-ms"),
      row("Jitter", ms(results.latency?.jitterMs), "jitter-ms"),
      row("Latency while downloading", ms(loaded.downloadMs), "download-ms"),
      row("Latency while uploading", ms(loaded.uploadMs), "upload-ms"),
      row("Latency both ways", ms(loaded.bidirectionalMs), "both-ms"),
      row("Download", mbps(results.downloadMbps), "download-mbps"),
      row("Upload", mbps(results.uploadMbps), "upload-mbps"),
    ),
    cards ?? householdCards(results.household ?? []),
  );
}

const RISE: Record<string, string> = {
  none: "no latency rise",
  mild: "a mild latency rise",
  moderate: "a moderate latency rise",
  severe: "a severe latency rise",
};

function householdCards(users: NonNullable<SessionResults["household"]>): HTMLElement {
  const labels: Record<HouseholdUser, string> = {
    gaming: "Gaming",
    videoCall: "Video call",
    streaming: "Streaming",
    bulk: "Bulk download",
  };
  return h(
    "div",
    { class: "household", id: "household" },
    ...HOUSEHOLD.map((user) => {
      const result = users.find((u) => u.user === user);
      return h(
        "div",
        { class: `card ${result?.severity ?? ""}`, id: `user-${user}` },
        h("h3", {}, labels[user]),
        h("p", { class: "live" }, result ? `${result.meanMs.toFixed(1)} ms mean` : "waiting"),
        h("p", {}, result ? `baseline ${result.baselineMs.toFixed(1)} ms, jitter ${result.jitterMs.toFixed(1)} ms` : ""),
        h("p", { class: "severity" }, result ? `${RISE[result.severity] ?? result.severity}, ${result.sharePercent.toFixed(0)} % of its share` : ""),
      );
    }),
  );
}

function testView() {
  const button = h("button", { id: "start" }, "Test my connection") as HTMLButtonElement;
  const status = h("p", { id: "status", class: "status" }, "One click: a session of your own, then the bufferbloat test and your household.");
  // The graph appears once there is something to draw.
  const canvas = h("canvas", { id: "test-chart", class: "chart hidden" }) as HTMLCanvasElement;
  const rates = h("p", { id: "rates", class: "rates" });
  const output = h("div", { id: "output" });
  show(h("section", { class: "panel" }, button, status, canvas, rates), output);
  button.addEventListener("click", () => void runTest(button, status, canvas, rates, output));
}

async function runTest(
  button: HTMLButtonElement,
  status: HTMLElement,
  canvas: HTMLCanvasElement,
  rates: HTMLElement,
  output: HTMLElement,
) {
  button.disabled = true;
  canvas.classList.remove("hidden");
  const chart = new LatencyChart(canvas, 15_000);
  exposed.chart = chart;
  const began = nowUs();
  const live = { down: 0, up: 0 };
  const cards = householdCards([]);
  const observer: Observer = {
    phase: (label, length) => {
      status.textContent = `Measuring: ${label} (${(length / 1000).toFixed(1)} s)`;
      live.down = 0;
      live.up = 0;
      rates.textContent = "";
    },
    rtt: (rtt, pod) => chart.add((nowUs() - began) / 1000, rtt, pod),
    rate: (direction, value) => {
      live[direction] = value;
      const shown = (["down", "up"] as const).filter((d) => live[d] > 0).map((d) => `${d} ${mbps(live[d])}`);
      rates.textContent = shown.join(" · ");
    },
    user: (user, rtt, down) => {
      const card = cards.querySelector(`#user-${user} .live`);
      if (card) card.textContent = `${rtt.toFixed(1)} ms now, ${mbps(down)}`;
    },
  };
  try {
    status.textContent = "Getting a session…";
    const pool = await firstPool();
    const session = await createSession(pool, "bufferbloat");
    exposed.session = session;
    const streams = new SessionStreams(session as SessionView & { token: string });
    status.textContent = `Session ${session.name} on pod ${session.pod ?? "?"}`;
    const measured = await bufferbloat(streams, DEFAULT_SETTINGS, observer);
    const first = await streams.submit(measured, false);
    output.replaceChildren(resultsBlock(first.results, cards));
    rates.textContent = "";
    const line = measured.downloadMbps ?? 0;
    if (line <= 0) throw new Error("the download phase received nothing, so the household cannot run");
    const users = await household(streams, line, DEFAULT_SETTINGS, observer);
    const final = await streams.submit({ ...measured, household: users }, true);
    exposed.results = final.results;
    const link = `${location.origin}${location.pathname}#/results/${session.namespace}/${session.name}/${session.token}`;
    const linkBox = h("input", { id: "results-link", readonly: "", value: link }) as HTMLInputElement;
    const copy = h("button", { id: "copy-link" }, "Copy link");
    copy.addEventListener("click", () => void navigator.clipboard?.writeText(link));
    output.replaceChildren(resultsBlock(final.results), h("p", { class: "link" }, "Your results: ", linkBox, copy));
    status.textContent = final.reported
      ? `Done. The results are in TestSession ${session.namespace}/${session.name}.`
      : `Done, but the results did not reach the cluster: ${final.reportError ?? "unknown"}`;
    status.classList.add("done");
  } catch (error) {
    status.textContent = `The test stopped: ${describe(error)}`;
    status.classList.add("failed");
    if (chart.stats.points === 0) canvas.classList.add("hidden");
  } finally {
    button.disabled = false;
  }
}

/** The showcase: pings plotted as they arrive, and a button that kills the
 * pod serving the session so the graph shows the gap and the heal. */
function liveView() {
  const start = h("button", { id: "live-start" }, "Start") as HTMLButtonElement;
  const kill = h("button", { id: "kill", class: "danger" }, "Kill my pod") as HTMLButtonElement;
  kill.disabled = true;
  const rate = h("select", { id: "hz" }, ...[10, 20, 50, 100].map((hz) => h("option", { value: String(hz) }, `${hz} pings/s`))) as HTMLSelectElement;
  rate.value = "20";
  const status = h("p", { id: "live-status", class: "status" }, "A session of your own, pinged over its WebSocket.");
  const canvas = h("canvas", { id: "live-chart", class: "chart tall" }) as HTMLCanvasElement;
  const legend = h("ul", { id: "pods", class: "legend" });
  show(h("section", { class: "panel" }, h("div", { class: "controls" }, start, rate, kill), status, canvas, legend));
  start.addEventListener("click", () => void runLive(start, kill, rate, status, canvas, legend));
}

async function runLive(
  start: HTMLButtonElement,
  kill: HTMLButtonElement,
  rate: HTMLSelectElement,
  status: HTMLElement,
  canvas: HTMLCanvasElement,
  legend: HTMLElement,
) {
  start.disabled = true;
  rate.disabled = true;
  const gone = leaving.signal;
  const chart = new LatencyChart(canvas);
  exposed.chart = chart;
  const began = performance.now();
  const hz = Number(rate.value);
  let session: SessionView;
  try {
    status.textContent = "Getting a session…";
    session = await createSession(await firstPool(), "latency");
  } catch (error) {
    status.textContent = `No session: ${describe(error)}`;
    start.disabled = false;
    rate.disabled = false;
    return;
  }
  exposed.session = session;
  const streams = new SessionStreams(session as SessionView & { token: string });
  const seen = new Set<string>();
  let pod = session.pod ?? "";
  let lostAt: number | undefined;
  let seq = 0;
  const sent = new Map<number, number>();
  const note = (name: string) => {
    if (seen.has(name)) return;
    seen.add(name);
    const swatch = h("span", { class: "swatch" });
    swatch.style.background = chart.colour(name);
    legend.append(h("li", {}, swatch, name));
  };
  // Tries again every 250 ms while the session heals, for at most a minute
  // and only while this view is shown.
  const connect = async (): Promise<WebSocket | undefined> => {
    const until = performance.now() + 60_000;
    while (!gone.aborted && performance.now() < until) {
      const socket = streams.websocket("/ws");
      try {
        await opened(socket, 3000);
        if (!gone.aborted) return socket;
        socket.close();
      } catch {
        await new Promise((resolve) => setTimeout(resolve, 250));
      }
    }
    return undefined;
  };
  const first = await connect();
  if (!first) {
    status.textContent = "The session's pod could not be reached.";
    return;
  }
  let socket = first;
  const attach = (current: WebSocket) => {
    current.addEventListener("message", (event) => {
      if (typeof event.data !== "string") return;
      const message = JSON.parse(event.data);
      if (message.type === "terminating") status.textContent = `Pod ${message.pod} is going away…`;
      if (message.type !== "pong") return;
      const sentAt = sent.get(message.seq);
      if (sentAt === undefined) return;
      sent.delete(message.seq);
      const now = performance.now();
      note(message.pod);
      if (lostAt !== undefined && message.pod !== pod) {
        const gapMs = now - lostAt;
        exposed.heals.push({ from: pod, to: message.pod, gapMs });
        status.textContent = `Healed onto pod ${message.pod} after ${gapMs.toFixed(0)} ms without an answer.`;
        chart.gap(lostAt - began, now - began);
        lostAt = undefined;
      }
      pod = message.pod;
      chart.add(now - began, now - sentAt, message.pod);
    });
    current.addEventListener("close", () => {
      if (socket !== current || gone.aborted) return;
      lostAt ??= performance.now();
      chart.gap(lostAt - began);
      status.textContent = `Pod ${pod} stopped answering; the session is healing…`;
      void connect().then((next) => {
        if (!next) {
          if (!gone.aborted) status.textContent = `The session did not come back within a minute.`;
          return;
        }
        socket = next;
        attach(next);
      });
    });
  };
  attach(socket);
  status.textContent = `Pinging pod ${pod} ${hz} times a second.`;
  kill.disabled = false;
  kill.addEventListener("click", () => {
    if (socket.readyState === WebSocket.OPEN) socket.send(JSON.stringify({ type: "terminate" }));
  });
  const pinging = setInterval(() => {
    if (socket.readyState !== WebSocket.OPEN) return;
    const now = performance.now();
    sent.set(seq, now);
    // Pongs that never came (the pod died) are forgotten after 10 s.
    for (const [old, at] of sent) if (now - at > 10_000) sent.delete(old);
    socket.send(JSON.stringify({ type: "ping", seq, clientTimeUs: Math.round(now * 1000) }));
    seq++;
  }, 1000 / hz);
  gone.addEventListener("abort", () => {
    clearInterval(pinging);
    socket.close();
  });
}

async function resultsView(namespace: string, name: string, token: string) {
  show(h("p", { class: "status", id: "status" }, "Reading the results…"));
  try {
    const session = await readSession(namespace, name, token);
    exposed.session = session;
    exposed.results = session.results;
    if (!session.results) {
      show(h("p", { class: "status", id: "status" }, `Session ${namespace}/${name} has no results yet (${session.phase}).`));
      return;
    }
    show(h("p", { class: "status done", id: "status" }, `TestSession ${namespace}/${name}, ${session.phase}`), resultsBlock(session.results));
  } catch (error) {
    show(h("p", { class: "status failed", id: "status" }, `Cannot read the results: ${describe(error)}`));
  }
}

/** For operators: the namespace's pools and sessions and every backend,
 * updated as the operator's watches see changes. Needs a Kubernetes token
 * that may list TestSessions there and read Backends; it stays in this
 * page's memory. */
function clusterView() {
  const token = h("input", { id: "cluster-token", type: "password", placeholder: "Kubernetes token", autocomplete: "off" }) as HTMLInputElement;
  const namespace = h("input", { id: "cluster-namespace", placeholder: "namespace (the gateway's default)" }) as HTMLInputElement;
  const connect = h("button", { id: "cluster-connect" }, "Watch") as HTMLButtonElement;
  const status = h("p", { id: "cluster-status", class: "status" }, "For the cluster's operators: a token that may list TestSessions and read Backends (and list Tubes, to see them).");
  const tables = h("div", { id: "cluster-tables" });
  show(h("section", { class: "panel" }, h("div", { class: "controls" }, token, namespace, connect), status), tables);
  let watching: AbortController | undefined;
  connect.addEventListener("click", () => {
    watching?.abort();
    const abort = new AbortController();
    watching = abort;
    leaving.signal.addEventListener("abort", () => abort.abort());
    status.textContent = "Connecting…";
    const follow = async () => {
      while (!abort.signal.aborted) {
        try {
          await watchCluster(token.value.trim(), namespace.value.trim(), abort.signal, (view) => {
            exposed.cluster = view;
            status.textContent = `Namespace ${view.namespace}: live, updated ${new Date().toLocaleTimeString()}`;
            status.className = "status done";
            tables.replaceChildren(...clusterTables(view));
          });
        } catch (error) {
          if (abort.signal.aborted) return;
          status.textContent = `The cluster view stopped: ${describe(error)}`;
          status.className = "status failed";
          if (error instanceof ApiError && error.status >= 400 && error.status < 500 && error.status !== 429) return;
        }
        // The operator ends a stream after ten minutes; carry on.
        await new Promise((resolve) => setTimeout(resolve, 2000));
      }
    };
    void follow();
  });
}

function table(id: string, heads: string[], rows: string[][]): HTMLElement {
  return h(
    "table",
    { id, class: "grid" },
    h("thead", {}, h("tr", {}, ...heads.map((head) => h("th", {}, head)))),
    h("tbody", {}, ...rows.map((row) => h("tr", {}, ...row.map((cell) => h("td", {}, cell))))),
  );
}

function clusterTables(view: ClusterView): HTMLElement[] {
  const age = (seconds: number) => (seconds < 120 ? `${seconds} s` : seconds < 7200 ? `${Math.round(seconds / 60)} min` : `${Math.round(seconds / 3600)} h`);
  const percent = (value?: number) => (value === undefined ? "–" : `${value.toFixed(0)} %`);
  const bytes = (n: number) => (n < 1024 ? `${n} B` : n < 1 << 20 ? `${(n / 1024).toFixed(1)} KiB` : `${(n / (1 << 20)).toFixed(1)} MiB`);
  const since = (unix: number) => age(Math.max(0, Math.round(Date.now() / 1000 - unix)));
  const tubes = view.tubes
    ? table(
        "tubes",
        ["tube", "kind", "target", "pool", "state", "pod", "connections", "sent", "received", "age", "ended"],
        view.tubes.map((t) => [
          t.name,
          t.kind,
          t.target ?? "–",
          t.pool ?? "–",
          t.state,
          t.pod ?? "–",
          String(t.openConnections),
          bytes(t.bytesSent),
          bytes(t.bytesReceived),
          since(t.createdUnix),
          t.endReason ?? "–",
        ]),
      )
    : h("p", { id: "tubes-hidden", class: "status" }, "This token may not list Tubes in this namespace.");
  return [
    h("h2", {}, "Pools"),
    table(
      "pools",
      ["pool", "size", "warm", "assigned", "pending", "public"],
      view.pools.map((p) => [p.name, String(p.size), String(p.warm), String(p.assigned), String(p.pending), p.public ? "yes" : "no"]),
    ),
    h("h2", {}, `Sessions (${view.sessionsTotal})`),
    table(
      "sessions",
      ["session", "pool", "phase", "pod", "age", "grade"],
      view.sessions.map((s) => [s.name, s.pool, s.phase, s.pod ?? "–", since(s.createdUnix), s.grade ?? "–"]),
    ),
    h("h2", {}, view.tubes ? `Tubes (${view.tubesTotal})` : "Tubes"),
    tubes,
    h("h2", {}, "Backends"),
    table(
      "backends",
      ["backend", "kind", "region", "CPU per core", "memory", "GPUs", "health", "reports"],
      view.backends.map((b) => [
        b.name,
        b.kind,
        b.region ?? "–",
        b.corePercent.length === 0 ? "–" : b.corePercent.map((p) => p.toFixed(0)).join(" · "),
        percent(b.memoryUsedPercent),
        b.gpus === 0 ? "–" : `${b.gpus} at ${percent(b.gpuPercent)}`,
        b.health,
        b.stale ? "stale" : "fresh",
      ]),
    ),
  ];
}

function route() {
  const [view, ...rest] = location.hash.replace(/^#\/?/, "").split("/");
  if (view === "live") return liveView();
  if (view === "cluster") return clusterView();
  if (view === "results" && rest.length === 3) return void resultsView(...(rest.map(decodeURIComponent) as [string, string, string]));
  testView();
}

window.addEventListener("hashchange", route);
route();
