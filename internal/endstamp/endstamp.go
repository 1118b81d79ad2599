// Package endstamp records, in an ownership's context, when the ownership
// ended: package election stamps it, electiontest.EndedAt reads it.
package endstamp

import (
	"context"
	"sync/atomic"
	"time"
)

// Ender is what an ownership's context descends from (a coord.Epoch): it
// can end the ownership first, and then knows when.
type Ender interface {
	EndedAt() (at time.Time, ok bool)
}

// Stamp says when an ownership ended: the instant its elector stamped just
// before cancelling its context, or — when its parent ended first and
// cancelled the context as its parent — the parent's own end.
type Stamp struct {
	at     atomic.Pointer[time.Time]
	parent Ender
}

type key struct{}

// New returns a stamp for an ownership whose context descends from parent.
func New(parent Ender) *Stamp { return &Stamp{parent: parent} }

// Set stamps the instant the elector ended the ownership.
func (s *Stamp) Set(at time.Time) { s.at.Store(&at) }

// Into returns ctx carrying s.
func (s *Stamp) Into(ctx context.Context) context.Context {
	return context.WithValue(ctx, key{}, s)
}

// Of reports when the ownership whose context is ctx ended: the earlier of
// its stamp and its parent's end. ok is false while ctx is live or if ctx
// carries no stamp.
func Of(ctx context.Context) (at time.Time, ok bool) {
	s, _ := ctx.Value(key{}).(*Stamp)
	if s == nil || ctx.Err() == nil {
		return time.Time{}, false
	}
	own := s.at.Load()
	parentEnd, parentEnded := s.parent.EndedAt()
	switch {
	case own != nil && parentEnded:
		if parentEnd.Before(*own) {
			return parentEnd, true
		}
		return *own, true
	case own != nil:
		return *own, true
	case parentEnded:
		return parentEnd, true
	}
	return time.Time{}, false
}
