package coord

import (
	"context"
	"sync"
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
// revision rev, requesting a progress notification if it has not yet.
func (w *watchTracker) waitCaughtUp(ctx context.Context, rev int64) error {
	requested := false
	for {
		w.mu.Lock()
		request, done, reported := w.request, w.rev >= rev, w.reported
		w.mu.Unlock()
		if request == nil || done {
			return nil
		}
		if !requested {
			if err := request(ctx); err != nil {
				return err
			}
			requested = true
		}
		select {
		case <-reported:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}
