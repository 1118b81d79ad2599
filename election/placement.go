package election

import (
	"context"

	"github.com/batonhq/baton/coord"
)

// preferredElsewhere is where Place puts an app with no live owner: the
// first server by coord.RankWeighted over the live servers' placement
// weights that is alive. This server, when it comes first, needs no ping:
// the answer is nil (elect this server). Another is alive if it answers a
// ping as itself and its membership lease is live (its owner record is
// then bound to that lease). Servers that do not answer are marked down
// for this election and skipped; if none before this server in rank
// answers, or no Pinger is configured, the answer is nil.
func (e *Elector) preferredElsewhere(ctx context.Context, app int64, down map[string]bool) *handoverTarget {
	if e.cfg.Pinger == nil {
		return nil
	}
	for _, id := range coord.RankWeighted(app, coord.Placement(e.members.Servers(), "")) {
		if id == e.cfg.ServerID {
			return nil
		}
		if down[id] || e.unanswered.recently(id, e.cfg.clock.Now()) {
			continue
		}
		rec, ok := e.members.Get(id)
		if !ok {
			continue
		}
		pctx, cancel := context.WithTimeout(ctx, e.cfg.PingTimeout)
		_, err := e.cfg.Pinger.Ping(pctx, id, rec.Control)
		cancel()
		if err != nil {
			e.logger.Debug("preferred server did not answer a ping; trying the next", "app_id", app, "server", id, "error", err)
			down[id] = true
			e.unanswered.mark(id, e.cfg.clock.Now().Add(e.cfg.PingTimeout))
			continue
		}
		e.unanswered.clear(id)
		to, err := e.handoverTarget(ctx, id)
		if err != nil {
			e.logger.Debug("cannot place on the preferred server; trying the next", "app_id", app, "server", id, "error", err)
			down[id] = true
			continue
		}
		return &to
	}
	return nil
}
