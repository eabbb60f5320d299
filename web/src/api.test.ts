import { describe, expect, it } from "vitest";
import { EventParser } from "./api";

describe("server-sent events", () => {
  it("splits events across chunks and skips comments", () => {
    const parser = new EventParser();
    expect(parser.push("event: cluster\ndata: {\"a\"")).toEqual([]);
    expect(parser.push(":1}\n\n: nothing changed\n\nevent: cluster\r\ndata: 2\r\n\r\n")).toEqual([
      { event: "cluster", data: "{\"a\":1}" },
      { event: "cluster", data: "2" },
    ]);
  });

  it("joins data lines and names unnamed events message", () => {
    const parser = new EventParser();
    expect(parser.push("data: one\ndata:two\n\n")).toEqual([{ event: "message", data: "one\ntwo" }]);
    expect(parser.push("event: x\n\n")).toEqual([]);
  });
});
