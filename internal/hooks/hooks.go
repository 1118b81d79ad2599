// Package hooks carries the calls baton's packages make into one another
// that users must not make. The package that owns a hook's receiver sets it
// in its init; receivers are typed any because this package cannot import
// the packages that own their types (those packages import it). A hook
// called with the wrong type panics.
package hooks

import "context"

// Hooks set by package coord, receiver *coord.Session: the elector's one
// watch of the ownership range reports to its session's confirmation
// rounds (coord's package doc, "Watch step"), and tests crash a session.
var (
	// AttachWatch declares that the caller owns the server's watch of
	// the ownership range: from now on a round confirms only once the
	// watch has delivered everything up to the round's read revision, as
	// reported by WatchCaughtUp. requestProgress must ask etcd for a
	// progress notification on that watch without blocking beyond ctx.
	// Attaching again replaces the previous watch.
	AttachWatch func(session any, requestProgress func(ctx context.Context) error)
	// DetachWatch undoes AttachWatch; call it only when the server owns
	// nothing.
	DetachWatch func(session any)
	// WatchCaughtUp reports that the attached watch has delivered, and
	// its owner has processed, every event up to revision rev. It never
	// blocks.
	WatchCaughtUp func(session any, rev int64)
	// AbandonSession stops the session as a crash would: no more rounds
	// or keepalives, nothing revoked, the guard fired at once.
	AbandonSession func(session any)
)

// CrashNode, set by package server (receiver *server.Node), stops a node
// as a crash would; see servertest.Crash.
var CrashNode func(node any)
