// What both pages share: a latency series like the live graph's, fed at a
// fixed rate, and the frame intervals the page actually painted.

export interface Bench {
  /** Starts feeding `hz` points a second for `seconds`, then resolves with the frame intervals (ms). */
  run(hz: number, seconds: number): Promise<number[]>;
}

export function bench(add: (atMs: number, rttMs: number, pod: string) => void): Bench {
  return {
    run(hz, seconds) {
      return new Promise((resolve) => {
        const frames: number[] = [];
        let last = performance.now();
        const began = last;
        let running = true;
        const frame = (now: number) => {
          frames.push(now - last);
          last = now;
          if (running) requestAnimationFrame(frame);
        };
        requestAnimationFrame(frame);
        let n = 0;
        const timer = setInterval(() => {
          const at = performance.now() - began;
          // A pod swap halfway, as after "kill my pod".
          add(at, 20 + 5 * Math.sin(n / 7) + (n % 13 === 0 ? 15 : 0), n < (hz * seconds) / 2 ? "pod-a" : "pod-b");
          n++;
        }, 1000 / hz);
        setTimeout(() => {
          clearInterval(timer);
          running = false;
          resolve(frames.slice(1));
        }, seconds * 1000);
      });
    },
  };
}
