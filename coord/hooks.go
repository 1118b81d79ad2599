package coord

import (
	"context"

	"github.com/batonhq/baton/internal/hooks"
)

// The elector of package election reports its watch to the session
// through these; users have no reason to call them.
func init() {
	hooks.AttachWatch = func(s any, requestProgress func(context.Context) error) {
		s.(*Session).attachWatch(requestProgress)
	}
	hooks.DetachWatch = func(s any) { s.(*Session).detachWatch() }
	hooks.WatchCaughtUp = func(s any, rev int64) { s.(*Session).watchCaughtUp(rev) }
	hooks.AbandonSession = func(s any) { s.(*Session).abandon() }
}
