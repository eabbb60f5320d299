import { describe, expect, it } from "vitest";
import {
  LatencyTracker,
  Pacer,
  activeAt,
  bytesAt,
  loadedMedianMs,
  nextUploadBytes,
  pingSummary,
  quantile,
  rateMbps,
  reportSeries,
  rfc3550Jitter,
  severity,
  sharePercent,
  summarize,
  targetDownMbps,
  userRates,
} from "./measure";

// Cases copied from the Rust side's tests (protocol/src/grading.rs,
// cli/src/measure.rs): a change on one side must be made here too; these
// catch a port that went wrong, not a later change to the Rust.

describe("latency", () => {
  it("takes quantiles by the nearest rank", () => {
    const sorted = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10];
    expect(quantile(sorted, 0.5)).toBe(5);
    expect(quantile(sorted, 0.95)).toBe(10);
    expect(quantile(sorted, 0)).toBe(1);
    expect(quantile([], 0.5)).toBe(0);
  });

  it("summarizes round trips with RFC 3550 jitter and loss", () => {
    const summary = summarize([10, 12, 10, 14], 5);
    expect(summary.p50Ms).toBe(10);
    expect(summary.p99Ms).toBe(14);
    expect(summary.samples).toBe(4);
    expect(summary.lossPercent).toBe(20);
    // 2/16 = 0.125; += (2 - 0.125)/16 = 0.2421875; += (4 - 0.2421875)/16.
    expect(summary.jitterMs).toBeCloseTo(0.47705078125, 12);
    expect(rfc3550Jitter([10, 26])).toBe(1);
    expect(summarize([], 0).lossPercent).toBe(0);
  });

  it("counts only the window's pings, a missing pong as lost", () => {
    const pings = [{ sentUs: 0, rttUs: 9_000 }, { sentUs: 100, rttUs: 10_000 }, { sentUs: 200 }, { sentUs: 300, rttUs: 50_000 }];
    const summary = pingSummary(pings, 100, 300);
    expect(summary.samples).toBe(1);
    expect(summary.lossPercent).toBe(50);
    expect(summary.p50Ms).toBe(10);
  });

  it("counts a loaded ping still out as its time so far", () => {
    const pings = [{ sentUs: 0, rttUs: 10_000 }, { sentUs: 1_000 }, { sentUs: 2_000, rttUs: 30_000 }];
    expect(loadedMedianMs(pings, 0, 3_000, 101_000)).toBe(30);
    expect(loadedMedianMs(pings, 5_000, 6_000, 10_000)).toBeUndefined();
  });
});

describe("rates", () => {
  it("interpolates bytes and holds them past the ends", () => {
    const series: Array<[number, number]> = [[1_000, 0], [2_000, 1_000], [4_000, 2_000]];
    expect(bytesAt(series, 0)).toBe(0);
    expect(bytesAt(series, 1_500)).toBe(500);
    expect(bytesAt(series, 3_000)).toBe(1_500);
    expect(bytesAt(series, 9_000)).toBe(2_000);
    expect(bytesAt([], 5)).toBe(0);
  });

  it("sums streams over a window in Mbit/s", () => {
    const a: Array<[number, number]> = [[0, 0], [1_000_000, 1_250_000]];
    const b = reportSeries(0, [[1_000_000, 1_250_000]]);
    expect(rateMbps([a, b], 0, 1_000_000)).toBe(20);
    expect(rateMbps([a], 10, 10)).toBe(0);
  });

  it("sizes the next upload to last about 400 ms, within 256 KiB and 32 MiB", () => {
    expect(nextUploadBytes(1_000_000, 100)).toBe(4_000_000);
    expect(nextUploadBytes(1_000_000, 10)).toBe(4_000_000);
    expect(nextUploadBytes(1_000_000, 4_000)).toBe(262_144);
    expect(nextUploadBytes(60_000_000, 100)).toBe(32 * 1024 * 1024);
    expect(nextUploadBytes(1_000, 0)).toBe(262_144);
  });
});

describe("household", () => {
  it("gives each user its rates and schedule", () => {
    expect(userRates("bulk", 100)).toEqual([200, 2]);
    expect(userRates("bulk", 0.1)).toEqual([1, 2]);
    expect(userRates("bulk", 900)).toEqual([1000, 2]);
    expect(activeAt("streaming", 999)).toBe(true);
    expect(activeAt("streaming", 1_000)).toBe(false);
    expect(activeAt("streaming", 5_000)).toBe(true);
    expect(activeAt("gaming", 1_000)).toBe(true);
  });

  it("measures each share against what the user should get", () => {
    expect(targetDownMbps("streaming", 100)).toBe(5);
    expect(targetDownMbps("bulk", 100)).toBe(91);
    expect(targetDownMbps("bulk", 5)).toBe(1);
    expect(sharePercent("gaming", 0.75, 100)).toBe(50);
    expect(sharePercent("gaming", 3, 100)).toBe(100);
  });

  it("tracks baseline, rise and jitter as the reference does", () => {
    const tracker = new LatencyTracker();
    for (let i = 0; i < 10; i++) tracker.record(i * 100, 10);
    expect(tracker.increaseMs()).toBe(0);
    for (let i = 0; i < 10; i++) tracker.record(1_000 + i * 500, 30);
    expect(tracker.baselineMs()).toBe(10);
    expect(tracker.meanMs()).toBe(20);
    expect(tracker.jitterMs()).toBe(10);
    expect(tracker.severity()).toBe("mild");
    expect(severity(9.9)).toBe("none");
    expect(severity(50)).toBe("moderate");
    expect(severity(200)).toBe("severe");
  });

  it("paces bytes with at most 100 ms of credit", () => {
    const pacer = new Pacer(8);
    expect(pacer.advance(1_000, true)).toBe(1_000);
    expect(pacer.advance(1_000_000, true)).toBe(100_000);
    expect(pacer.advance(1_000, false)).toBe(0);
  });
});
