// Runs the connection test in the browser against a session pod, through
// the gateway: the bufferbloat phases (idle, download, upload, both) and the
// virtual household. Its schedule and figures follow the CLI's engine, so
// the pod, which grades both with the same code, gives the same letters.

import { type SessionResults, type HouseholdUserResult, SessionStreams, opened } from "./api";
import {
  BASELINE_INTERVAL_MS,
  BASELINE_PINGS,
  HOUSEHOLD,
  type HouseholdUser,
  LatencyTracker,
  Pacer,
  type Ping,
  type Series,
  activeAt,
  loadedMedianMs,
  nextUploadBytes,
  pingSummary,
  rateMbps,
  reportSeries,
  sharePercent,
  userRates,
} from "./measure";

export interface Settings {
  pingHz: number;
  /** Streams per direction; twice as many uploads in the upload phase.
   * Three: a browser opens at most six HTTP/1.1 connections to one host. */
  streams: number;
  phaseMs: number;
  householdMs: number;
  householdPingMs: number;
}

export const DEFAULT_SETTINGS: Settings = { pingHz: 10, streams: 3, phaseMs: 2500, householdMs: 10_000, householdPingMs: 500 };

/** Follows a run as it goes; every method may do nothing. */
export interface Observer {
  phase(label: string, ms: number): void;
  rtt(ms: number, pod: string): void;
  rate(direction: "down" | "up", mbps: number): void;
  user(user: HouseholdUser, rttMs: number, downMbps: number): void;
}

/** The share of a loaded phase before its measurement window (TCP ramping up). */
const WARMUP = 0.25;
const IDLE_SHARE = 0.8;
const SAMPLE_MS = 100;
const MAX_STREAM_SECONDS = 60;
const MAX_UPLOAD_BODY = 32 * 1024 * 1024;

export const nowUs = () => Math.round(performance.now() * 1000);
const sleepUntil = (us: number) => new Promise((resolve) => setTimeout(resolve, Math.max(0, (us - nowUs()) / 1000)));
const streamSeconds = (untilUs: number) => Math.min(Math.ceil((untilUs - nowUs()) / 1e6) + 1, MAX_STREAM_SECONDS);

/** Incompressible bytes to upload, made once. */
let randomChunk: Uint8Array<ArrayBuffer> | undefined;
function random(): Uint8Array<ArrayBuffer> {
  if (!randomChunk) {
    randomChunk = new Uint8Array(1024 * 1024);
    for (let at = 0; at < randomChunk.length; at += 65536) crypto.getRandomValues(randomChunk.subarray(at, at + 65536));
  }
  return randomChunk;
}

/** Upload bodies by size, made once each: a new Blob per request would
 * leave the browser's blob storage to the garbage collector, and Chromium
 * refuses new blobs (ERR_BLOB_OUT_OF_MEMORY) long before it runs. Sizes are
 * powers of two, so at most nine are ever made. */
const bodies = new Map<number, Blob>();
function uploadBody(bytes: number): Blob {
  let size = 256 * 1024;
  while (size < bytes && size < MAX_UPLOAD_BODY) size *= 2;
  let body = bodies.get(size);
  if (!body) {
    const chunk = random();
    const parts: BlobPart[] = [];
    for (let left = size; left > 0; left -= chunk.length) parts.push(left >= chunk.length ? chunk : chunk.subarray(0, left));
    body = new Blob(parts);
    bodies.set(size, body);
  }
  return body;
}

/** Latency pings over the session's WebSocket, at `hz`, until finished. */
class Pinger {
  readonly pings: Ping[] = [];
  private readonly timer: ReturnType<typeof setInterval>;

  constructor(
    private readonly socket: WebSocket,
    hz: number,
    observer: Observer,
  ) {
    socket.addEventListener("message", (event) => {
      if (typeof event.data !== "string") return;
      const message = JSON.parse(event.data);
      if (message.type !== "pong") return;
      const ping = this.pings[message.seq];
      if (ping && ping.rttUs === undefined) {
        ping.rttUs = nowUs() - ping.sentUs;
        observer.rtt(ping.rttUs / 1000, message.pod);
      }
    });
    this.ping();
    this.timer = setInterval(() => this.ping(), 1000 / hz);
  }

  private ping() {
    const sentUs = nowUs();
    const seq = this.pings.length;
    this.pings.push({ sentUs });
    if (this.socket.readyState === WebSocket.OPEN) this.socket.send(JSON.stringify({ type: "ping", seq, clientTimeUs: sentUs }));
  }

  /** Stops pinging and closes the socket at once (a run that failed). */
  stop() {
    clearInterval(this.timer);
    this.socket.close();
  }

  /** Stops pinging and waits up to `graceMs` for the last pongs. */
  async finish(graceMs = 1000): Promise<Ping[]> {
    clearInterval(this.timer);
    const until = nowUs() + graceMs * 1000;
    while (nowUs() < until && this.pings.some((p) => p.rttUs === undefined)) await sleepUntil(nowUs() + 20_000);
    this.socket.close();
    return this.pings;
  }
}

async function download(streams: SessionStreams, untilUs: number, received: { bytes: number }) {
  const abort = new AbortController();
  const timer = setTimeout(() => abort.abort(), Math.max(0, (untilUs - nowUs()) / 1000));
  try {
    while (nowUs() < untilUs) {
      const response = await fetch(streams.url(`/download?seconds=${streamSeconds(untilUs)}`), {
        headers: streams.headers(),
        signal: abort.signal,
        cache: "no-store",
      });
      if (!response.ok || !response.body) throw new Error(`the download was refused (${response.status})`);
      const reader = response.body.getReader();
      for (;;) {
        const { done, value } = await reader.read();
        if (done) break;
        received.bytes += value.byteLength;
      }
    }
  } catch (error) {
    if (!abort.signal.aborted) throw error;
  } finally {
    clearTimeout(timer);
  }
}

/** Uploads back to back until the phase ends; each request's report, with
 * what the pod received when, goes into `series`. */
async function upload(streams: SessionStreams, untilUs: number, series: Series[], sent: { bytes: number }) {
  let size = 256 * 1024;
  while (nowUs() + 100_000 < untilUs) {
    const started = nowUs();
    const body = uploadBody(size);
    const response = await fetch(streams.url(`/upload?seconds=${streamSeconds(untilUs)}`), {
      method: "POST",
      headers: streams.headers(),
      body,
    });
    if (!response.ok) throw new Error(`the upload was refused (${response.status})`);
    const report: { bytes: number; elapsedUs: number; samples: Array<[number, number]> } = await response.json();
    // The pod times its samples from the first byte it got, which left here
    // a queue's delay after `started` once the line is loaded. Its answer
    // leaves right after the last byte and comes back on the idle direction,
    // so the report is pinned to its arrival instead.
    const finished = nowUs();
    series.push(reportSeries(finished - report.elapsedUs, report.samples));
    sent.bytes += report.bytes;
    size = nextUploadBytes(body.size, (nowUs() - started) / 1000);
  }
}

interface Loaded {
  window: [number, number];
  downloadMbps?: number;
  uploadMbps?: number;
}

/** A loaded phase: downloads, uploads or both, with the live rates shown. */
async function loaded(
  streams: SessionStreams,
  settings: Settings,
  observer: Observer,
  down: boolean,
  up: boolean,
): Promise<Loaded> {
  const start = nowUs();
  const end = start + settings.phaseMs * 1000;
  const window: [number, number] = [start + settings.phaseMs * WARMUP * 1000, end];
  const received = { bytes: 0 };
  const sent = { bytes: 0 };
  const downloads: Series = [];
  const uploads: Series[] = [];
  const work: Promise<void>[] = [];
  // An upload is a run of requests, each waiting for its answer before the
  // next, so alone it takes all six connections to keep a buffer as full as
  // the CLI's long uploads do. Three downloads already fill the line; six
  // lose more than they gain through a deep buffer.
  const uploadCount = down ? settings.streams : 2 * settings.streams;
  for (let i = 0; i < settings.streams; i++) if (down) work.push(download(streams, end, received));
  for (let i = 0; i < uploadCount; i++) if (up) work.push(upload(streams, end, uploads, sent));
  const sampling = (async () => {
    // Uploads count only when their report comes back, in lumps; over the
    // phase so far, the rates shown are steady.
    while (nowUs() < end) {
      await sleepUntil(Math.min(nowUs() + SAMPLE_MS * 1000, end));
      const now = nowUs();
      downloads.push([now, received.bytes]);
      const us = Math.max(now - start, 1);
      if (down) observer.rate("down", (received.bytes * 8) / us);
      if (up) observer.rate("up", (sent.bytes * 8) / us);
    }
  })();
  await Promise.all([...work, sampling]);
  return {
    window,
    downloadMbps: down ? rateMbps([downloads], window[0], window[1]) : undefined,
    uploadMbps: up ? rateMbps(uploads, window[0], window[1]) : undefined,
  };
}

/** The bufferbloat test: idle pings, then pings under download, upload and both. */
export async function bufferbloat(streams: SessionStreams, settings: Settings, observer: Observer): Promise<SessionResults> {
  const socket = streams.websocket("/ws");
  await opened(socket);
  const pinger = new Pinger(socket, settings.pingHz, observer);
  try {
    return await phases(streams, settings, observer, pinger);
  } catch (error) {
    pinger.stop();
    throw error;
  }
}

async function phases(streams: SessionStreams, settings: Settings, observer: Observer, pinger: Pinger): Promise<SessionResults> {
  const idleStart = nowUs();
  const idleMs = settings.phaseMs * IDLE_SHARE;
  observer.phase("idle", idleMs);
  await sleepUntil(idleStart + idleMs * 1000);
  const idleEnd = nowUs();
  observer.phase("download", settings.phaseMs);
  const downloadPhase = await loaded(streams, settings, observer, true, false);
  observer.phase("upload", settings.phaseMs);
  const uploadPhase = await loaded(streams, settings, observer, false, true);
  observer.phase("download + upload", settings.phaseMs);
  const bothPhase = await loaded(streams, settings, observer, true, true);
  const pings = await pinger.finish();
  const now = nowUs();
  const latency = pingSummary(pings, idleStart, idleEnd);
  if (latency.samples === 0) throw new Error("no ping came back from the pod");
  const median = (phase: Loaded) => loadedMedianMs(pings, phase.window[0], phase.window[1], now);
  return {
    latency,
    loadedLatency: { downloadMs: median(downloadPhase), uploadMs: median(uploadPhase), bidirectionalMs: median(bothPhase) },
    downloadMbps: downloadPhase.downloadMbps,
    uploadMbps: uploadPhase.uploadMbps,
  };
}

/** The household: four users on their own sockets, a second of idle pings,
 * then each user's traffic, paced, for `householdMs`. */
export async function household(
  streams: SessionStreams,
  lineMbps: number,
  settings: Settings,
  observer: Observer,
): Promise<HouseholdUserResult[]> {
  const sockets = HOUSEHOLD.map((user) => streams.websocket(`/ws/household/${user}`));
  try {
    await Promise.all(sockets.map((socket) => opened(socket)));
  } catch (error) {
    sockets.forEach((socket) => socket.close());
    throw error;
  }
  const begin = nowUs();
  const start = begin + BASELINE_PINGS * BASELINE_INTERVAL_MS * 1000;
  const end = start + settings.householdMs * 1000;
  observer.phase("household baseline", BASELINE_PINGS * BASELINE_INTERVAL_MS);
  setTimeout(() => observer.phase("household", settings.householdMs), (start - nowUs()) / 1000);
  return Promise.all(
    HOUSEHOLD.map((user, i) => runUser(user, sockets[i], { begin, start, end }, lineMbps, settings, observer)),
  );
}

interface Schedule {
  begin: number;
  start: number;
  end: number;
}

async function runUser(
  user: HouseholdUser,
  socket: WebSocket,
  schedule: Schedule,
  lineMbps: number,
  settings: Settings,
  observer: Observer,
): Promise<HouseholdUserResult> {
  const pongs: Array<[number, number]> = [];
  let downBytes = 0;
  let sent = 0;
  let failure: Error | undefined;
  const closed = new Promise<void>((resolve) => socket.addEventListener("close", () => resolve(), { once: true }));
  socket.addEventListener("message", (event) => {
    if (typeof event.data !== "string") {
      if (nowUs() < schedule.end) downBytes += (event.data as ArrayBuffer).byteLength;
      return;
    }
    const message = JSON.parse(event.data);
    if (message.type === "pong") {
      const rttUs = nowUs() - message.clientTimeUs;
      pongs.push([message.clientTimeUs, rttUs]);
      const elapsed = Math.max(nowUs() - schedule.start, 1);
      observer.user(user, rttUs / 1000, nowUs() > schedule.start ? (downBytes * 8) / elapsed : 0);
    } else if (message.type === "error") {
      failure = new Error(`the pod refused a household message: ${message.message}`);
    }
  });
  const ping = () => {
    socket.send(JSON.stringify({ type: "ping", seq: sent, clientTimeUs: nowUs() }));
    sent++;
  };
  for (let i = 0; i < BASELINE_PINGS; i++) {
    await sleepUntil(schedule.begin + i * BASELINE_INTERVAL_MS * 1000);
    ping();
  }
  await sleepUntil(schedule.start);
  socket.send(JSON.stringify({ type: "start", lineMbps }));
  const pacer = new Pacer(userRates(user, lineMbps)[1]);
  const data = random();
  let offset = 0;
  let nextPing = schedule.start;
  let last = schedule.start;
  while (nowUs() < schedule.end && socket.readyState === WebSocket.OPEN) {
    const now = nowUs();
    if (now >= nextPing) {
      ping();
      nextPing += settings.householdPingMs * 1000;
    }
    const due = pacer.advance(now - last, activeAt(user, (now - schedule.start) / 1000));
    last = now;
    // A socket that cannot drain is the line's queue, not ours to grow.
    if (due > 0 && socket.bufferedAmount < 1024 * 1024) {
      const length = Math.min(due, data.length);
      if (offset + length > data.length) offset = 0;
      socket.send(data.subarray(offset, offset + length));
      offset += length;
    }
    await sleepUntil(now + 20_000);
  }
  const grace = schedule.end + 500_000;
  while (nowUs() < grace && pongs.length < sent && socket.readyState === WebSocket.OPEN) await sleepUntil(nowUs() + 20_000);
  socket.close();
  await Promise.race([closed, sleepUntil(nowUs() + 1_000_000)]);
  if (failure) throw failure;
  if (pongs.length === 0) throw new Error(`the household's ${user} user got no pong from the pod`);
  pongs.sort((a, b) => a[0] - b[0]);
  const tracker = new LatencyTracker();
  for (const [sentUs, rttUs] of pongs) tracker.record(Math.floor((sentUs - schedule.begin) / 1000), rttUs / 1000);
  const achievedMbps = (downBytes * 8) / (settings.householdMs * 1000);
  return {
    user,
    baselineMs: tracker.baselineMs(),
    meanMs: tracker.meanMs(),
    jitterMs: tracker.jitterMs(),
    sharePercent: sharePercent(user, achievedMbps, lineMbps),
    severity: tracker.severity(),
  };
}
