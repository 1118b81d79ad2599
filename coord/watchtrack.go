package coord

import (
	"context"
	"sync"
	"time"
)

// watchTracker is the session's side of step 2 of a confirmation round:
// the owner of the server's one watch of the owner keys reports how far
// the watch has delivered, and asks etcd for a progress notification when
// a round needs it.
type watchTracker struct {
	mu       sync.Mutex
	request  func(context.Context) error // nil: no watch attached
	rev      int64                       // delivered up to here
	reported chan struct{}               // closed and replaced at each report
}

func (w *watchTracker) init() { w.reported = make(chan struct{}) }

// attachWatch declares that the caller owns the server's watch of the
// ownership range (hooks.AttachWatch). From now on a round confirms only once
// the watch has delivered everything up to the round's read revision, as
// reported by watchCaughtUp. requestProgress must ask etcd for a progress
// notification on that watch (clientv3.Watcher.RequestProgress with the
// watch's context); it must not block beyond ctx. A session has at most
// one watch; attaching again replaces it.
func (s *Session) attachWatch(requestProgress func(ctx context.Context) error) {
	s.watch.mu.Lock()
	defer s.watch.mu.Unlock()
	s.watch.request = requestProgress
	s.watch.rev = 0
}

// detachWatch undoes attachWatch: rounds no longer wait for a watch. Call
// it only when the server owns nothing.
func (s *Session) detachWatch() {
	s.watch.mu.Lock()
	defer s.watch.mu.Unlock()
	s.watch.request = nil
}

// watchCaughtUp reports that the attached watch has delivered, and its
// owner has processed, every event up to revision rev (the header revision
// of a watch response, events or progress notification). It never blocks.
func (s *Session) watchCaughtUp(rev int64) {
	s.watch.mu.Lock()
	defer s.watch.mu.Unlock()
	if rev > s.watch.rev {
		s.watch.rev = rev
		close(s.watch.reported)
		s.watch.reported = make(chan struct{})
	}
}

// waitCaughtUp returns once the attached watch (if any) has delivered
// revision rev. It asks etcd for a progress notification at once and
// again every resend while it waits: etcd answers such a request only if
// every watcher on the stream is synced and the stream's buffer has room
// at that moment, and otherwise drops it without a word (etcd PR 15237:
// the client is meant to infer progress from events). A watch that falls
// behind for a moment under load and then catches up with no newer event
// for it would leave a round that asked only once waiting out its whole
// budget, and under sustained load every round would.
func (w *watchTracker) waitCaughtUp(ctx context.Context, rev int64, resend time.Duration) error {
	var again *time.Timer
	defer func() {
		if again != nil {
			again.Stop()
		}
	}()
	ask := true
	for {
		w.mu.Lock()
		request, done, reported := w.request, w.rev >= rev, w.reported
		w.mu.Unlock()
		if request == nil || done {
			return nil
		}
		if ask {
			if err := request(ctx); err != nil {
				return err
			}
			ask = false
			if again == nil {
				again = time.NewTimer(resend)
			} else {
				again.Reset(resend)
			}
		}
		select {
		case <-reported:
		case <-again.C:
			ask = true
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}
