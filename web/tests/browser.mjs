// Drives Debian's Chromium through the web UI, as a user would, against a
// gateway: the connection test with its household, the results link, and the
// live latency graph with its pod killed and healed. Prints one JSON report
// on stdout for the Rust test that started it, and leaves screenshots in the
// output directory.
//
//   node tests/browser.mjs <gateway URL> <output directory> [all|test]
//
// `test` stops after the connection test.

import { mkdirSync } from "node:fs";
import { join } from "node:path";
import { chromium } from "playwright-core";

const [url, out, mode = "all"] = process.argv.slice(2);
if (!url || !out || !["all", "test"].includes(mode)) {
  console.error("usage: node tests/browser.mjs <gateway URL> <output directory> [all|test]");
  process.exit(2);
}
mkdirSync(out, { recursive: true });

// Chromium as root on a closed network: no sandbox, no calls home.
const browser = await chromium.launch({
  executablePath: process.env.TIDEPOOL_CHROMIUM ?? "/usr/bin/chromium",
  args: [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
  ],
});
const report = { consoleErrors: [], pageErrors: [] };
const fail = async (page, what) => {
  await page.screenshot({ path: join(out, "failure.png"), fullPage: true }).catch(() => {});
  report.failure = `${what}: ${(await page.textContent("body").catch(() => "")) ?? ""}`.slice(0, 2000);
  console.log(JSON.stringify(report));
  await browser.close();
  process.exit(1);
};

try {
  const page = await browser.newPage({ viewport: { width: 1100, height: 1000 } });
  page.on("console", (message) => {
    if (message.type() === "error") report.consoleErrors.push(message.text());
  });
  page.on("pageerror", (error) => report.pageErrors.push(String(error)));

  // The connection test: one click, then the grades and the household.
  await page.goto(`${url}/#/`);
  await page.waitForSelector("#start");
  await page.screenshot({ path: join(out, "test-ready.png"), fullPage: true });
  // The session's create is held back until the page has been seen
  // waiting for it: the loading state. Only in the full run: the shaped
  // line's run times its measurement, and is left as it was.
  let release = () => {};
  if (mode === "all") {
    const held = new Promise((resolve) => (release = resolve));
    await page.route("**/api/v1/sessions", async (route) => {
      if (route.request().method() === "POST") await held;
      await route.continue();
    });
  }
  await page.click("#start");
  if (mode === "all") {
    await page
      .waitForFunction(() => document.querySelector("#status")?.textContent?.startsWith("Getting a session"), null, { timeout: 10_000 })
      .catch(() => fail(page, "the page did not say it was getting a session"));
    report.loadingStatus = await page.textContent("#status");
    report.loadingButtonDisabled = await page.isDisabled("#start");
    await page.screenshot({ path: join(out, "test-loading.png"), fullPage: true });
    // Later creates pass straight through: the promise has resolved.
    release();
  }
  // While it measures: the phase, the live rates and the graph.
  await page
    .waitForFunction(() => document.querySelector("#status")?.textContent?.startsWith("Measuring: download"), null, { timeout: 30_000 })
    .catch(() => fail(page, "the test never started measuring"));
  await page.waitForTimeout(1_500);
  await page.screenshot({ path: join(out, "test-running.png"), fullPage: true });
  await page
    .waitForFunction(() => document.querySelector("#status")?.textContent?.startsWith("Measuring: upload"), null, { timeout: 30_000 })
    .catch(() => fail(page, "the test never measured the upload"));
  await page.waitForTimeout(1_500);
  await page.screenshot({ path: join(out, "test-running-upload.png"), fullPage: true });
  report.uploadRates = await page.textContent("#rates");
  await page.waitForSelector("#household", { timeout: 60_000 }).catch(() => fail(page, "no bufferbloat results"));
  await page.waitForTimeout(4_000);
  await page.screenshot({ path: join(out, "test-household-running.png"), fullPage: true });
  await page
    .waitForSelector("#status.done, #status.failed", { timeout: 90_000 })
    .catch(() => fail(page, "the test did not finish"));
  report.status = await page.textContent("#status");
  await page.screenshot({ path: join(out, "test-results.png"), fullPage: true });
  if (await page.$("#status.failed")) await fail(page, "the test failed");
  const exposed = await page.evaluate(() => {
    const { results, session } = window.tidepool;
    return { results, session: { name: session.name, namespace: session.namespace, pod: session.pod } };
  });
  report.results = exposed.results;
  report.session = exposed.session;
  report.shownGrades = {
    bufferbloat: await page.textContent("#grade-bufferbloat"),
    household: await page.textContent("#grade-household"),
    overall: await page.textContent("#grade-overall"),
  };
  report.link = await page.inputValue("#results-link");
  if (mode === "test") {
    console.log(JSON.stringify(report));
    await browser.close();
    process.exit(0);
  }

  // The link reads the results back from the TestSession.
  await page.goto(report.link);
  await page.waitForSelector("#status.done, #status.failed", { timeout: 20_000 });
  report.linkStatus = await page.textContent("#status");
  report.linkGrades = {
    bufferbloat: await page.textContent("#grade-bufferbloat").catch(() => null),
    household: await page.textContent("#grade-household").catch(() => null),
  };
  await page.screenshot({ path: join(out, "results-link.png"), fullPage: true });
  // A link whose token is wrong: the page says so, and shows nothing else.
  await page.goto(report.link.replace(/\/[^/]+$/, "/not-a-token"));
  await page.waitForSelector("#status.failed", { timeout: 20_000 }).catch(() => fail(page, "a bad link was not refused"));
  report.badLinkStatus = await page.textContent("#status");
  await page.screenshot({ path: join(out, "results-error.png"), fullPage: true });

  // The live graph: points as they come, then the pod killed and healed.
  await page.goto(`${url}/#/live`);
  await page.click("#live-start");
  await page
    .waitForFunction(() => (window.tidepool.chart?.stats.points ?? 0) >= 40, null, { timeout: 30_000 })
    .catch(() => fail(page, "the live graph got no points"));
  await page.screenshot({ path: join(out, "live.png"), fullPage: true });
  const before = await page.evaluate(() => window.tidepool.chart.stats.points);
  await page.click("#kill");
  await page
    .waitForFunction(() => window.tidepool.heals.length > 0, null, { timeout: 60_000 })
    .catch(() => fail(page, "the session did not heal"));
  await page.waitForTimeout(3_000);
  await page.screenshot({ path: join(out, "live-healed.png"), fullPage: true });
  const live = await page.evaluate(() => {
    const { chart, heals, session } = window.tidepool;
    const draws = [...chart.stats.drawMs].sort((a, b) => a - b);
    return {
      heals,
      pod: session.pod,
      points: chart.stats.points,
      frames: chart.stats.frames,
      drawMsP50: draws[Math.floor(draws.length * 0.5)] ?? 0,
      drawMsP99: draws[Math.min(draws.length - 1, Math.floor(draws.length * 0.99))] ?? 0,
    };
  });
  report.live = { ...live, pointsBeforeKill: before };
  report.liveStatus = await page.textContent("#live-status");

  // The cluster view, with an operator's token: the pools and the sessions
  // this run made, live.
  const token = process.env.TIDEPOOL_CLUSTER_TOKEN;
  if (!token) throw new Error("TIDEPOOL_CLUSTER_TOKEN must hold a token that may watch the cluster");
  await page.goto(`${url}/#/cluster`);
  await page.fill("#cluster-token", token);
  if (process.env.TIDEPOOL_CLUSTER_NAMESPACE) await page.fill("#cluster-namespace", process.env.TIDEPOOL_CLUSTER_NAMESPACE);
  await page.click("#cluster-connect");
  await page
    .waitForFunction(() => (window.tidepool.cluster?.sessions.length ?? 0) > 0, null, { timeout: 20_000 })
    .catch(() => fail(page, "the cluster view showed no sessions"));
  if (process.env.TIDEPOOL_CLUSTER_TUBE) {
    await page
      .waitForSelector(`#tubes td:text-is("${process.env.TIDEPOOL_CLUSTER_TUBE}")`, { timeout: 20_000 })
      .catch(() => fail(page, "the cluster view showed no tube"));
  }
  await page.screenshot({ path: join(out, "cluster.png"), fullPage: true });
  report.cluster = await page.evaluate(() => window.tidepool.cluster);
  // A token the operator does not accept: the page says so.
  await page.goto(`${url}/#/`);
  await page.goto(`${url}/#/cluster`);
  await page.fill("#cluster-token", "not-a-kubernetes-token");
  await page.click("#cluster-connect");
  await page.waitForSelector("#cluster-status.failed", { timeout: 20_000 }).catch(() => fail(page, "a bad token was not refused"));
  report.clusterErrorStatus = await page.textContent("#cluster-status");
  await page.screenshot({ path: join(out, "cluster-error.png"), fullPage: true });

  // The address's anonymous sessions used up (the live graph's is still
  // open; one more made here): the test says why and when to try again.
  await page.goto(`${url}/#/`);
  await page.evaluate(async () => {
    const pools = await (await fetch("/api/v1/pools")).json();
    const pool = pools.pools[0];
    await fetch("/api/v1/sessions", {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify({ pool: pool.name, namespace: pool.namespace }),
    });
  });
  await page.click("#start");
  await page.waitForSelector("#status.failed", { timeout: 30_000 }).catch(() => fail(page, "the limit was not shown"));
  report.limitStatus = await page.textContent("#status");
  await page.screenshot({ path: join(out, "test-error.png"), fullPage: true });
  console.log(JSON.stringify(report));
  await browser.close();
} catch (error) {
  report.failure = String(error?.stack ?? error);
  console.log(JSON.stringify(report));
  await browser.close();
  process.exit(1);
}
