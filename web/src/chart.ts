// A latency chart on a canvas: points as they arrive, coloured by the pod
// that answered, over a sliding window. Drawn at most once per animation
// frame and only when something changed, so a 100 Hz series costs one
// redraw per frame, not one per point. A charting library would redraw
// through a virtual DOM or SVG per point; this is the whole of what we need.

export interface FrameStats {
  frames: number;
  /** Time spent drawing, per frame, in ms. */
  drawMs: number[];
  points: number;
}

const COLOURS = ["#2b8cbe", "#e6550d", "#31a354", "#756bb1", "#de2d26", "#636363"];
const CAPACITY = 100 * 120;

export class LatencyChart {
  private readonly times = new Float64Array(CAPACITY);
  private readonly values = new Float64Array(CAPACITY);
  private readonly pods = new Uint8Array(CAPACITY);
  private start = 0;
  private count = 0;
  private readonly podNames: string[] = [];
  private readonly gaps: Array<[number, number | undefined]> = [];
  private dirty = false;
  private frame = 0;
  readonly stats: FrameStats = { frames: 0, drawMs: [], points: 0 };

  constructor(
    readonly canvas: HTMLCanvasElement,
    private readonly windowMs = 30_000,
  ) {}

  /** The colour a pod's points are drawn in. */
  colour(pod: string): string {
    return COLOURS[this.podIndex(pod) % COLOURS.length];
  }

  private podIndex(pod: string): number {
    let index = this.podNames.indexOf(pod);
    if (index < 0) index = this.podNames.push(pod) - 1;
    return index;
  }

  add(atMs: number, rttMs: number, pod: string) {
    const slot = (this.start + this.count) % CAPACITY;
    this.times[slot] = atMs;
    this.values[slot] = rttMs;
    this.pods[slot] = this.podIndex(pod) % 256;
    if (this.count < CAPACITY) this.count++;
    else this.start = (this.start + 1) % CAPACITY;
    this.stats.points++;
    this.schedule();
  }

  /** A stretch with no answers (the pod was killed); `toMs` once it healed. */
  gap(fromMs: number, toMs?: number) {
    const open = this.gaps.at(-1);
    if (open && open[1] === undefined) open[1] = toMs;
    else this.gaps.push([fromMs, toMs]);
    this.schedule();
  }

  private schedule() {
    if (this.dirty) return;
    this.dirty = true;
    this.frame = requestAnimationFrame(() => this.draw());
  }

  stop() {
    cancelAnimationFrame(this.frame);
  }

  private draw() {
    const began = performance.now();
    this.dirty = false;
    const ratio = window.devicePixelRatio || 1;
    const width = this.canvas.clientWidth;
    const height = this.canvas.clientHeight;
    if (this.canvas.width !== Math.round(width * ratio)) this.canvas.width = Math.round(width * ratio);
    if (this.canvas.height !== Math.round(height * ratio)) this.canvas.height = Math.round(height * ratio);
    const context = this.canvas.getContext("2d");
    if (!context) return;
    context.setTransform(ratio, 0, 0, ratio, 0, 0);
    context.clearRect(0, 0, width, height);
    const last = this.count > 0 ? this.times[(this.start + this.count - 1) % CAPACITY] : 0;
    const from = Math.max(last - this.windowMs, 0);
    let max = 1;
    for (let i = 0; i < this.count; i++) {
      const slot = (this.start + i) % CAPACITY;
      if (this.times[slot] >= from) max = Math.max(max, this.values[slot]);
    }
    const top = niceCeiling(max * 1.1);
    const left = 44;
    const bottom = height - 20;
    const x = (t: number) => left + ((t - from) / this.windowMs) * (width - left - 8);
    const y = (ms: number) => bottom - (ms / top) * (bottom - 8);

    context.fillStyle = "rgba(222, 45, 38, 0.12)";
    for (const [gapFrom, gapTo] of this.gaps) {
      const a = Math.max(x(gapFrom), left);
      const b = x(gapTo ?? last);
      if (b > left) context.fillRect(a, 8, b - a, bottom - 8);
    }
    context.strokeStyle = "#ccc";
    context.fillStyle = "#555";
    context.font = "11px system-ui, sans-serif";
    context.lineWidth = 1;
    for (const fraction of [0, 0.5, 1]) {
      const ms = top * fraction;
      context.beginPath();
      context.moveTo(left, y(ms));
      context.lineTo(width - 8, y(ms));
      context.stroke();
      context.fillText(`${formatMs(ms)} ms`, 2, y(ms) + 4);
    }
    context.fillText(`last ${Math.round(this.windowMs / 1000)} s`, left, height - 4);
    for (let i = 0; i < this.count; i++) {
      const slot = (this.start + i) % CAPACITY;
      if (this.times[slot] < from) continue;
      context.fillStyle = COLOURS[this.pods[slot] % COLOURS.length];
      context.fillRect(x(this.times[slot]) - 1.5, y(this.values[slot]) - 1.5, 3, 3);
    }
    this.stats.frames++;
    this.stats.drawMs.push(performance.now() - began);
    if (this.stats.drawMs.length > 2000) this.stats.drawMs.splice(0, 1000);
  }
}

function niceCeiling(value: number): number {
  const power = 10 ** Math.floor(Math.log10(value));
  for (const step of [1, 2, 5, 10]) if (step * power >= value) return step * power;
  return 10 * power;
}

function formatMs(ms: number): string {
  return ms >= 10 ? ms.toFixed(0) : ms.toFixed(1);
}
