// The chart benchmark: our canvas chart beside React with Recharts, each
// fed the live graph's series at 100 points a second for 10 s in Debian's
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
const SECONDS = 10;

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
  const frames = await tab.evaluate(([hz, seconds]) => window.bench.run(hz, seconds), [HZ, SECONDS]);
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
  });
}
await browser.close();
server.close();

console.log(`${HZ} points/s for ${SECONDS} s, 30 s window, Chromium headless:\n`);
console.log("| chart | JS bundle (gzip) | frames painted | frame interval p50 | p99 | worst | frames over 33 ms |");
console.log("| --- | --- | --- | --- | --- | --- | --- |");
for (const r of rows) {
  const kb = (bytes) => `${(bytes / 1024).toFixed(1)} KiB`;
  console.log(
    `| ${r.name} | ${kb(r.bundle.raw)} (${kb(r.bundle.gzip)}) | ${r.frames} | ${r.p50.toFixed(1)} ms | ${r.p99.toFixed(1)} ms | ${r.worst.toFixed(1)} ms | ${r.late} |`,
  );
}
const [ours, theirs] = rows;
console.log(`\nbundle: ${(theirs.bundle.gzip / ours.bundle.gzip).toFixed(1)}x smaller; frames over 33 ms: ${ours.late} vs ${theirs.late}`);
