package election

import (
	"context"
	"maps"
)

// A server that stops owning an app (Resign, HandOver, a drain) owes the
// app's owner key a release: its successor's record written over it, or
// its deletion. If that write fails — etcd unreachable for a moment — the
// key keeps naming this server under a live lease, so no successor takes
// the app over and other servers' elections, which find this server
// answering pings, send workers here, while this server does not act. The
// debt is therefore kept and paid in the background, every second, until
// the write succeeds or the key no longer holds the token; meanwhile the
// server keeps refusing to own the app again.

// owe records releases still to be made (app → token of the stopped
// ownership). Called with e.mu held.
func (e *Elector) owe(tokens map[int64]int64) {
	until := e.cfg.clock.Now().Add(2 * e.session.TTL())
	for app, token := range tokens {
		e.owed[app] = token
		e.giveUp(app, token, until)
	}
}

// releaseOrOwe hands on or deletes the owner keys of stopped ownerships
// (app → token) and keeps every one it could not release for retrying.
func (e *Elector) releaseOrOwe(ctx context.Context, tokens map[int64]int64) error {
	err := e.transferOrDelete(ctx, tokens)
	if err != nil {
		e.mu.Lock()
		e.owe(tokens)
		e.mu.Unlock()
		e.logger.Info("releasing owner keys failed; retrying in the background", "apps", len(tokens), "error", err)
	}
	return err
}

// payDebts retries the releases still owed, dropping those whose key has
// changed meanwhile (the table shows another token, or no key).
func (e *Elector) payDebts() {
	e.mu.Lock()
	for app, token := range e.owed {
		if k, ok := e.table[app]; e.rev >= token && (!ok || k.modRev != token) {
			delete(e.owed, app)
		}
	}
	owed := maps.Clone(e.owed)
	e.mu.Unlock()
	if len(owed) == 0 {
		return
	}
	ctx, cancel := context.WithTimeout(e.ctx, e.session.TTL())
	defer cancel()
	err := e.transferOrDelete(ctx, owed)
	e.mu.Lock()
	defer e.mu.Unlock()
	if err != nil {
		e.owe(owed) // keeps the resignation period running
		e.logger.Debug("releasing owner keys failed again", "apps", len(owed), "error", err)
		return
	}
	for app, token := range owed {
		if e.owed[app] == token {
			delete(e.owed, app)
		}
	}
	e.logger.Info("owed owner keys released", "apps", len(owed))
}
