// The showcase's way: React state holding the window's points, re-rendered
// by Recharts as each one arrives. No JSX, so no React plugin is needed.
import { createElement as h, useEffect, useState } from "react";
import { createRoot } from "react-dom/client";
import { CartesianGrid, Line, LineChart, XAxis, YAxis } from "recharts";
import { bench } from "./feed";

interface Point {
  at: number;
  a?: number;
  b?: number;
}

let push: (point: Point) => void = () => {};

function Chart() {
  const [points, setPoints] = useState<Point[]>([]);
  useEffect(() => {
    push = (point) => setPoints((old) => [...old.filter((p) => p.at > point.at - 30_000), point]);
  }, []);
  return h(
    LineChart,
    { width: 960, height: 320, data: points },
    h(CartesianGrid, { strokeDasharray: "3 3" }),
    h(XAxis, { dataKey: "at", type: "number", domain: ["dataMin", "dataMax"] }),
    h(YAxis, {}),
    h(Line, { dataKey: "a", stroke: "#2b8cbe", dot: false, isAnimationActive: false }),
    h(Line, { dataKey: "b", stroke: "#e6550d", dot: false, isAnimationActive: false }),
  );
}

createRoot(document.getElementById("chart") as HTMLElement).render(h(Chart));
(window as unknown as { bench: unknown }).bench = bench((at, rtt, pod) =>
  push(pod === "pod-a" ? { at, a: rtt } : { at, b: rtt }),
);
