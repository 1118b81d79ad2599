package election_test

import (
	"context"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/batonhq/baton/election"
	"github.com/batonhq/baton/election/electiontest"
)

// event is one callback or context cancellation, stamped on this
// process's monotonic clock.
type event struct {
	server string
	app    int64
	token  int64
	kind   string // "acquire", "cancel" (the OnAcquire ctx ended), "lose"
	reason election.Reason
	at     time.Time
}

// recorder collects every node's ownership events and checks the
// callback promises as they happen: per server and app, acquire and lose
// alternate with matching tokens, and no two callbacks of one app on one
// server overlap.
type recorder struct {
	mu       sync.Mutex
	events   []event
	open     map[string]int64 // server/app → token of the open acquire
	inflight map[string]bool  // server/app → a callback is running
	problems []string
	notify   chan struct{}
	wg       sync.WaitGroup // cancel watchers; each ends when its ownership does
}

func newRecorder() *recorder {
	return &recorder{open: map[string]int64{}, inflight: map[string]bool{}, notify: make(chan struct{})}
}

func (r *recorder) callbacks(server string) election.Callbacks {
	return election.Callbacks{
		OnAcquire: func(ctx context.Context, app, token int64) {
			k := fmt.Sprintf("%s/%d", server, app)
			r.enter(k)
			defer r.leave(k)
			at := time.Now()
			r.mu.Lock()
			if _, open := r.open[k]; open {
				r.problems = append(r.problems, fmt.Sprintf("%s: acquire %d while %d is open", k, token, r.open[k]))
			}
			r.open[k] = token
			r.mu.Unlock()
			// After open is updated: a waiter woken by this event must
			// find the app owned (the last acquisition has no event after
			// it to wake the waiter again).
			r.add(event{server: server, app: app, token: token, kind: "acquire", at: at})
			r.wg.Go(func() {
				<-ctx.Done()
				at, ok := electiontest.EndedAt(ctx)
				if !ok {
					r.mu.Lock()
					r.problems = append(r.problems, fmt.Sprintf("%s: ownership %d ended without an end stamp", k, token))
					r.mu.Unlock()
					at = time.Now()
				}
				r.add(event{server: server, app: app, token: token, kind: "cancel", at: at})
			})
		},
		OnLose: func(app, token int64, reason election.Reason) {
			k := fmt.Sprintf("%s/%d", server, app)
			r.enter(k)
			defer r.leave(k)
			r.mu.Lock()
			if open, ok := r.open[k]; !ok || open != token {
				r.problems = append(r.problems, fmt.Sprintf("%s: lose %d without its acquire (open: %d, %v)", k, token, open, ok))
			}
			delete(r.open, k)
			r.mu.Unlock()
			r.add(event{server: server, app: app, token: token, kind: "lose", reason: reason, at: time.Now()})
		},
	}
}

func (r *recorder) enter(k string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.inflight[k] {
		r.problems = append(r.problems, k+": callbacks overlap")
	}
	r.inflight[k] = true
}

func (r *recorder) leave(k string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.inflight[k] = false
}

func (r *recorder) add(ev event) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.events = append(r.events, ev)
	close(r.notify)
	r.notify = make(chan struct{})
}

// snapshot returns a copy of the events so far.
func (r *recorder) snapshot() []event {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]event(nil), r.events...)
}

// wait blocks until cond holds over the events or timeout passes.
func (r *recorder) wait(timeout time.Duration, cond func([]event) bool) bool {
	deadline := time.After(timeout)
	for {
		r.mu.Lock()
		events, ch := append([]event(nil), r.events...), r.notify
		r.mu.Unlock()
		if cond(events) {
			return true
		}
		select {
		case <-ch:
		case <-deadline:
			return false
		}
	}
}

// owners returns, per app, the servers with an open acquire.
func (r *recorder) owners() map[int64][]string {
	r.mu.Lock()
	defer r.mu.Unlock()
	out := map[int64][]string{}
	for k := range r.open {
		var server string
		var app int64
		if i := strings.LastIndexByte(k, '/'); i > 0 {
			server = k[:i]
			app, _ = strconv.ParseInt(k[i+1:], 10, 64)
		}
		out[app] = append(out[app], server)
	}
	return out
}

// check returns every broken promise seen, and every overlap of two
// servers' ownership intervals of one app: an interval runs from acquire
// to its cancel.
func (r *recorder) check() []string {
	problems, _ := r.checkTolerating(0)
	return problems
}

// expectClean reports every problem check finds as a test error.
func (r *recorder) expectClean(t *testing.T) {
	t.Helper()
	for _, p := range r.check() {
		t.Error(p)
	}
}

// checkTolerating is check, except that overlaps no longer than tolerance
// are not problems; it also returns the longest overlap seen.
func (r *recorder) checkTolerating(tolerance time.Duration) (problems []string, worst time.Duration) {
	r.mu.Lock()
	defer r.mu.Unlock()
	problems = append(problems, r.problems...)
	type interval struct {
		server     string
		token      int64
		start, end time.Time
	}
	byApp := map[int64][]*interval{}
	openIv := map[string]*interval{}
	for _, ev := range r.events {
		k := fmt.Sprintf("%s/%d/%d", ev.server, ev.app, ev.token)
		switch ev.kind {
		case "acquire":
			iv := &interval{server: ev.server, token: ev.token, start: ev.at}
			openIv[k] = iv
			byApp[ev.app] = append(byApp[ev.app], iv)
		case "cancel":
			if iv := openIv[k]; iv != nil {
				iv.end = ev.at
				delete(openIv, k)
			}
		}
	}
	for app, ivs := range byApp {
		for i, a := range ivs {
			for _, b := range ivs[i+1:] {
				if a.server == b.server {
					continue
				}
				aEnd, bEnd := a.end, b.end
				if aEnd.IsZero() {
					aEnd = time.Now()
				}
				if bEnd.IsZero() {
					bEnd = time.Now()
				}
				if a.start.Before(bEnd) && b.start.Before(aEnd) {
					end, start := aEnd, a.start
					if bEnd.Before(end) {
						end = bEnd
					}
					if b.start.After(start) {
						start = b.start
					}
					overlap := end.Sub(start)
					worst = max(worst, overlap)
					if overlap <= tolerance {
						continue
					}
					problems = append(problems, fmt.Sprintf("app %d: %s (token %d, %v–%v) and %s (token %d, %v–%v) overlap",
						app, a.server, a.token, a.start.Format("15:04:05.000000"), aEnd.Format("15:04:05.000000"),
						b.server, b.token, b.start.Format("15:04:05.000000"), bEnd.Format("15:04:05.000000")))
				}
			}
		}
		// Tokens strictly increase across acquisitions by different
		// servers (the same token may come back to the same server). An
		// OnAcquire that ran after its ownership had already ended (its
		// ctx was cancelled first: a quick handover can overtake the
		// callback goroutine) is an empty interval and has no place in
		// the order.
		ivs = slices.DeleteFunc(slices.Clone(ivs), func(iv *interval) bool { return !iv.end.IsZero() && !iv.end.After(iv.start) })
		for i := 1; i < len(ivs); i++ {
			if ivs[i].token < ivs[i-1].token || ivs[i].token == ivs[i-1].token && ivs[i].server != ivs[i-1].server {
				problems = append(problems, fmt.Sprintf("app %d: token %d (%s) after %d (%s)", app, ivs[i].token, ivs[i].server, ivs[i-1].token, ivs[i-1].server))
			}
		}
	}
	return problems, worst
}
