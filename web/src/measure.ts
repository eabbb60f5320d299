// The arithmetic of a test run, free of I/O so it is plain unit tests. It
// follows the CLI's (cli/src/measure.rs and protocol/src/grading.rs) so a
// browser and the CLI on the same line report the same figures; the pod
// grades what either sends with the same Rust code.

/** `[µs on the run's clock, bytes so far]`, in time order. */
export type Series = Array<[number, number]>;

/** One latency ping: when it left, and its round trip once back. */
export interface Ping {
  sentUs: number;
  rttUs?: number;
}

export interface LatencySummary {
  p50Ms: number;
  p95Ms: number;
  p99Ms: number;
  jitterMs: number;
  lossPercent: number;
  samples: number;
}

/** The `q` quantile of sorted values by the nearest rank, as the pod takes it. */
export function quantile(sorted: number[], q: number): number {
  if (sorted.length === 0) return 0;
  const rank = Math.ceil(Math.min(Math.max(q, 0), 1) * sorted.length);
  return sorted[Math.min(Math.max(rank, 1), sorted.length) - 1];
}

export function median(values: number[]): number {
  return quantile([...values].sort((a, b) => a - b), 0.5);
}

/** RFC 3550 interarrival jitter over consecutive values. */
export function rfc3550Jitter(values: number[]): number {
  let jitter = 0;
  for (let i = 1; i < values.length; i++) {
    jitter += (Math.abs(values[i] - values[i - 1]) - jitter) / 16;
  }
  return jitter;
}

/** Idle latency from round trips (ms, arrival order) and the pings sent. */
export function summarize(rttsMs: number[], sent: number): LatencySummary {
  const sorted = [...rttsMs].sort((a, b) => a - b);
  const lost = Math.max(sent - rttsMs.length, 0);
  return {
    p50Ms: quantile(sorted, 0.5),
    p95Ms: quantile(sorted, 0.95),
    p99Ms: quantile(sorted, 0.99),
    jitterMs: rfc3550Jitter(rttsMs),
    lossPercent: sent === 0 ? 0 : (100 * lost) / sent,
    samples: rttsMs.length,
  };
}

const inWindow = (p: Ping, fromUs: number, toUs: number) => p.sentUs >= fromUs && p.sentUs < toUs;

/** The pings sent in `[fromUs, toUs)`, summarized; a ping not back is lost. */
export function pingSummary(pings: Ping[], fromUs: number, toUs: number): LatencySummary {
  const window = pings.filter((p) => inWindow(p, fromUs, toUs));
  const rtts = window.flatMap((p) => (p.rttUs === undefined ? [] : [p.rttUs / 1000]));
  return summarize(rtts, window.length);
}

/** The median round trip of the pings sent in the window. A ping still out
 * at `nowUs` counts as its time so far: under a deep buffer the slowest
 * pings are the ones that matter, and leaving them out would flatter the line. */
export function loadedMedianMs(pings: Ping[], fromUs: number, toUs: number, nowUs: number): number | undefined {
  const rtts = pings
    .filter((p) => inWindow(p, fromUs, toUs))
    .map((p) => (p.rttUs ?? Math.max(nowUs - p.sentUs, 0)) / 1000);
  return rtts.length === 0 ? undefined : median(rtts);
}

/** Bytes at `atUs`, interpolated between samples and held past the ends. */
export function bytesAt(series: Series, atUs: number): number {
  let after = 0;
  while (after < series.length && series[after][0] <= atUs) after++;
  const before = after > 0 ? series[after - 1] : undefined;
  const next = series[after];
  if (!before) return next ? next[1] : 0;
  if (!next) return before[1];
  const fraction = (atUs - before[0]) / (next[0] - before[0]);
  return before[1] + fraction * (next[1] - before[1]);
}

/** Mbit/s over `[fromUs, toUs]`, summed over streams. */
export function rateMbps(series: Series[], fromUs: number, toUs: number): number {
  if (toUs <= fromUs) return 0;
  const bytes = series.reduce((sum, s) => sum + Math.max(bytesAt(s, toUs) - bytesAt(s, fromUs), 0), 0);
  return (bytes * 8) / (toUs - fromUs);
}

/** An upload report's samples (µs since the pod's first byte) on the run's clock. */
export function reportSeries(firstByteUs: number, samples: Array<[number, number]>): Series {
  return [[firstByteUs, 0], ...samples.map(([t, bytes]): [number, number] => [firstByteUs + t, bytes])];
}

/** The next upload body: sized so one request lasts about `targetMs` at the
 * rate the last one went, within 256 KiB and 32 MiB. Small bodies would
 * leave the line idle between requests; huge ones would overrun the phase. */
export function nextUploadBytes(lastBytes: number, lastMs: number, targetMs = 400): number {
  const min = 256 * 1024;
  const max = 32 * 1024 * 1024;
  if (lastMs <= 0) return min;
  const next = (lastBytes * targetMs) / lastMs;
  return Math.round(Math.min(Math.max(next, min), Math.min(max, lastBytes * 4)));
}

// The virtual household (protocol/src/pod.rs).

export type HouseholdUser = "gaming" | "videoCall" | "streaming" | "bulk";
export const HOUSEHOLD: HouseholdUser[] = ["gaming", "videoCall", "streaming", "bulk"];
export const BASELINE_PINGS = 10;
export const BASELINE_INTERVAL_MS = 100;

/** Down and up Mbit/s while active; the bulk user asks for twice the line. */
export function userRates(user: HouseholdUser, lineMbps: number): [number, number] {
  switch (user) {
    case "gaming":
      return [1.5, 0.75];
    case "videoCall":
      return [2.5, 2.5];
    case "streaming":
      return [25, 0.1];
    case "bulk":
      return [Math.min(Math.max(2 * lineMbps, 1), 1000), 2];
  }
}

/** Streaming is on for the first second of every five; the rest always. */
export function activeAt(user: HouseholdUser, elapsedMs: number): boolean {
  return user !== "streaming" || elapsedMs % 5000 < 1000;
}

function meanDownMbps(user: HouseholdUser, lineMbps: number): number {
  const [down] = userRates(user, lineMbps);
  return user === "streaming" ? down / 5 : down;
}

/** What a user should get down: its mean ask, and for bulk what the others leave. */
export function targetDownMbps(user: HouseholdUser, lineMbps: number): number {
  if (user !== "bulk") return meanDownMbps(user, lineMbps);
  const others = HOUSEHOLD.filter((u) => u !== "bulk").reduce((sum, u) => sum + meanDownMbps(u, lineMbps), 0);
  return Math.min(Math.max(lineMbps - others, 1), userRates("bulk", lineMbps)[0]);
}

export function sharePercent(user: HouseholdUser, achievedMbps: number, lineMbps: number): number {
  return Math.min(Math.max((100 * achievedMbps) / targetDownMbps(user, lineMbps), 0), 100);
}

export type Severity = "none" | "mild" | "moderate" | "severe";

export function severity(increaseMs: number): Severity {
  if (increaseMs < 10) return "none";
  if (increaseMs < 50) return "mild";
  if (increaseMs < 200) return "moderate";
  return "severe";
}

const mean = (values: number[]) => (values.length === 0 ? 0 : values.reduce((a, b) => a + b, 0) / values.length);

/** One household user's latency: `[ms since the test began, rtt ms]` in send order. */
export class LatencyTracker {
  samples: Array<[number, number]> = [];

  record(atMs: number, rttMs: number) {
    this.samples.push([atMs, rttMs]);
  }

  baselineMs(): number {
    return mean(this.samples.slice(0, BASELINE_PINGS).map(([, rtt]) => rtt));
  }

  meanMs(): number {
    return mean(this.samples.map(([, rtt]) => rtt));
  }

  /** The standard deviation of the last 60 s. */
  jitterMs(): number {
    const last = this.samples.at(-1);
    if (!last) return 0;
    const window = this.samples.filter(([at]) => last[0] - at <= 60_000).map(([, rtt]) => rtt);
    const m = mean(window);
    return Math.sqrt(mean(window.map((x) => (x - m) * (x - m))));
  }

  /** The median after the baseline less the baseline: a TCP retransmission
   * holding one pong must not make a mild line look moderate. */
  increaseMs(): number {
    if (this.samples.length <= BASELINE_PINGS) return 0;
    return Math.max(median(this.samples.slice(BASELINE_PINGS).map(([, rtt]) => rtt)) - this.baselineMs(), 0);
  }

  severity(): Severity {
    return severity(this.increaseMs());
  }
}

/** Paces a user's upload: bytes due for the time gone by, with at most 100 ms of credit. */
export class Pacer {
  private credit = 0;
  private readonly bytesPerUs: number;

  constructor(mbps: number) {
    this.bytesPerUs = mbps / 8;
  }

  advance(elapsedUs: number, active: boolean): number {
    if (!active) {
      this.credit = 0;
      return 0;
    }
    const max = Math.max(this.bytesPerUs * 100_000, 1);
    this.credit = Math.min(this.credit + this.bytesPerUs * elapsedUs, max);
    const due = Math.floor(this.credit);
    this.credit -= due;
    return due;
  }
}
