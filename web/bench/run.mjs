// The chart benchmark: our canvas chart beside React with Recharts, each
// fed the live graph's series at 100 points a second for 40 s in Debian's
// Chromium, one after the other in one run. Prints each page's bundle
// (gzipped) and the frame intervals it painted. Run with
// `npm --prefix web run bench`.

import { readFileSync } from "node:fs";
import { createServer } from "node:http";
import { extname, join } from "node:path";
import { gzipSync } from "node:zlib";
import { chromium } from "playwright-core";

const dist = new URL("../dist-bench/", import.meta.url).pathname;
const HZ = 100;
// Long enough for the 30 s window to fill: 3000 points on screen at the end.
const SECONDS = 40;

// The JavaScript a page loads: its module script and what it preloads.
function bundle(page) {
  const html = readFileSync(join(dist, page), "utf8");
  const files = [...html.matchAll(/(?:src|href)="\/?(assets\/[^"]+\.js)"/g)].map((m) => m[1]);
  const bytes = files.map((f) => readFileSync(join(dist, f)));
  return {
    raw: bytes.reduce((sum, b) => sum + b.length, 0),
    gzip: bytes.reduce((sum, b) => sum + gzipSync(b).length, 0),
  };
}

const server = createServer((request, response) => {
  const path = join(dist, new URL(request.url, "http://x").pathname);
  if (!path.startsWith(dist)) return response.writeHead(400).end();
  try {
    const body = readFileSync(path);
    const type = { ".html": "text/html", ".js": "text/javascript", ".css": "text/css" }[extname(path)] ?? "application/octet-stream";
    response.writeHead(200, { "content-type": type }).end(body);
  } catch {
    response.writeHead(404).end();
  }
});
// Loopback only, for one browser, for the run: still bounded like any server.
server.headersTimeout = 5_000;
server.requestTimeout = 10_000;
server.keepAliveTimeout = 5_000;
server.maxConnections = 32;
await new Promise((resolve) => server.listen(0, "127.0.0.1", resolve));
const base = `http://127.0.0.1:${server.address().port}`;

const browser = await chromium.launch({
  executablePath: process.env.TIDEPOOL_CHROMIUM ?? "/usr/bin/chromium",
  args: ["--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync"],
});
const quantile = (sorted, q) => sorted[Math.min(sorted.length - 1, Math.floor(q * sorted.length))];
const rows = [];
for (const [name, page] of [
  ["Tidepool (canvas)", "ours.html"],
  ["React + Recharts", "recharts.html"],
]) {
  const tab = await browser.newPage({ viewport: { width: 1000, height: 400 } });
  await tab.goto(`${base}/${page}`);
  await tab.waitForFunction(() => window.bench !== undefined);
  // Main-thread time, from Chromium's own counters.
  const cdp = await tab.context().newCDPSession(tab);
  await cdp.send("Performance.enable");
  const busy = async () => {
    const { metrics } = await cdp.send("Performance.getMetrics");
    const get = (name) => metrics.find((m) => m.name === name)?.value ?? 0;
    return { task: get("TaskDuration"), script: get("ScriptDuration") };
  };
  const before = await busy();
  const frames = await tab.evaluate(([hz, seconds]) => window.bench.run(hz, seconds), [HZ, SECONDS]);
  const after = await busy();
  await tab.close();
  const sorted = [...frames].sort((a, b) => a - b);
  rows.push({
    name,
    bundle: bundle(page),
    frames: frames.length,
    p50: quantile(sorted, 0.5),
    p99: quantile(sorted, 0.99),
    worst: sorted.at(-1),
    late: frames.filter((f) => f > 1000 / 30).length,
    mainThread: (after.task - before.task) / SECONDS,
    script: (after.script - before.script) / SECONDS,
  });
}
await browser.close();
server.close();

console.log(`${HZ} points/s for ${SECONDS} s, 30 s window, Chromium headless:\n`);
console.log("| chart | JS bundle (gzip) | frames painted | frame interval p50 | p99 | worst | frames over 33 ms | main thread busy | of it script |");
console.log("| --- | --- | --- | --- | --- | --- | --- | --- | --- |");
for (const r of rows) {
  const kb = (bytes) => `${(bytes / 1024).toFixed(1)} KiB`;
  console.log(
    `| ${r.name} | ${kb(r.bundle.raw)} (${kb(r.bundle.gzip)}) | ${r.frames} | ${r.p50.toFixed(1)} ms | ${r.p99.toFixed(1)} ms | ${r.worst.toFixed(1)} ms | ${r.late} | ${(100 * r.mainThread).toFixed(1)} % | ${(100 * r.script).toFixed(1)} % |`,
  );
}
const [ours, theirs] = rows;
console.log(
  `\nours/theirs: bundle ${(ours.bundle.gzip / theirs.bundle.gzip).toFixed(3)}, main thread ${(ours.mainThread / theirs.mainThread).toFixed(3)}, frames over 33 ms ${ours.late} vs ${theirs.late}`,
);
