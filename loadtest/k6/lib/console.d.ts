// k6 provides a global `console` (log, info, warn, error, debug) that @types/k6 does not
// declare. The "dom" lib would declare it along with browser globals k6 lacks (fetch, window,
// …), so only what k6 implements is declared here.
declare var console: {
    log(...args: unknown[]): void;
    info(...args: unknown[]): void;
    warn(...args: unknown[]): void;
    error(...args: unknown[]): void;
    debug(...args: unknown[]): void;
};
