import { LatencyChart } from "../src/chart";
import { bench } from "./feed";

const chart = new LatencyChart(document.getElementById("chart") as HTMLCanvasElement);
(window as unknown as { bench: unknown }).bench = bench((at, rtt, pod) => chart.add(at, rtt, pod));
