// Builds the chart benchmark's two pages: our canvas chart and the same
// series in React with Recharts, as the showcase drew it.
import { resolve } from "node:path";
import { defineConfig } from "vite";

export default defineConfig({
  root: __dirname,
  logLevel: "warn",
  build: {
    outDir: resolve(__dirname, "../dist-bench"),
    emptyOutDir: true,
    rollupOptions: {
      input: { ours: resolve(__dirname, "ours.html"), recharts: resolve(__dirname, "recharts.html") },
    },
  },
});
