package election

import (
	"context"
	"time"

	"github.com/batonhq/baton/coord"
)

// takeoverQueue holds the apps this server should take over as successor:
// their owner key was deleted, so their previous owner has provably
// stopped (its lease expired after its guard fired, or it resigned), and
// this server ranks first for them among the live servers other than that
// owner. Apps stay listed as orphans until someone owns them, so that a
// membership change can hand them to a new successor.
type takeoverQueue struct {
	pending []int64
	queued  map[int64]time.Time // app → when its deletion was seen
	orphans map[int64]string    // app → previous owner, while unowned
	signal  chan struct{}       // capacity 1; a value means "look at pending"
}

func (q *takeoverQueue) init() {
	q.queued = map[int64]time.Time{}
	q.orphans = map[int64]string{}
	q.signal = make(chan struct{}, 1)
}

func (q *takeoverQueue) wake() {
	select {
	case q.signal <- struct{}{}:
	default:
	}
}

// considerTakeover queues app if this server is its successor. Called
// with e.mu held.
func (e *Elector) considerTakeover(app int64, prevOwner string) {
	if e.draining || e.closed {
		return
	}
	if _, owned := e.table[app]; owned {
		delete(e.takeover.orphans, app)
		return
	}
	e.takeover.orphans[app] = prevOwner
	if _, ok := e.takeover.queued[app]; ok {
		return
	}
	if e.successor(app, prevOwner) != e.cfg.ServerID {
		return
	}
	e.takeover.queued[app] = time.Now()
	e.takeover.pending = append(e.takeover.pending, app)
	e.takeover.wake()
}

// successor is the live server ranked first for app, not counting
// exclude (the owner that just left: its membership key may still be
// listed for a moment). Empty when there is none.
func (e *Elector) successor(app int64, exclude string) string {
	var ids []string
	for _, s := range e.members.Servers() {
		if s.ServerID != exclude {
			ids = append(ids, s.ServerID)
		}
	}
	id, _ := coord.Successor(app, ids)
	return id
}

// takeoverLoop elects this server for queued apps; ElectionConcurrency
// of them run at once.
func (e *Elector) takeoverLoop() {
	for {
		select {
		case <-e.takeover.signal:
		case <-e.ctx.Done():
			return
		}
		for {
			e.mu.Lock()
			if len(e.takeover.pending) == 0 {
				e.mu.Unlock()
				break
			}
			app := e.takeover.pending[0]
			e.takeover.pending = e.takeover.pending[1:]
			seen := e.takeover.queued[app]
			delete(e.takeover.queued, app)
			if len(e.takeover.pending) > 0 {
				e.takeover.wake() // let another loop help
			}
			e.mu.Unlock()

			ctx, cancel := context.WithTimeout(e.ctx, e.cfg.LockTimeout+e.cfg.PingTimeout)
			o, err := e.ensureOwner(ctx, app)
			cancel()
			switch {
			case err != nil:
				e.logger.Info("successor takeover failed; workers will ask", "app_id", app, "error", err)
			case o.serverID == e.cfg.ServerID:
				e.metrics.takeover(time.Since(seen).Seconds())
			}
		}
	}
}

// membersLoop reconsiders orphaned apps whenever the live-server set
// changes: a successor that died before taking its apps over is replaced
// by the next one.
func (e *Elector) membersLoop() {
	changed := e.members.Changed()
	for {
		select {
		case <-changed:
		case <-e.ctx.Done():
			return
		}
		changed = e.members.Changed() // before reading: no change slips by
		e.mu.Lock()
		for app, prev := range e.takeover.orphans {
			e.considerTakeover(app, prev)
		}
		e.mu.Unlock()
	}
}
