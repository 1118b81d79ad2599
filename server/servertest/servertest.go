// Package servertest helps test a scheduler built on baton's server: it
// crashes a node in-process, so that a test can watch its apps fail over
// without killing the test's own process.
package servertest

import (
	"github.com/batonhq/baton/internal/hooks"
	"github.com/batonhq/baton/server"
)

// Crash stops n the way a crash would: its HTTP server and every
// connection close at once, its session stops without revoking its lease
// (etcd expires the lease after its TTL, and with it n's keys), and
// nothing is handed over, so other servers take n's apps over only once
// the lease has expired. Unlike a real crash, n's ownership contexts are
// cancelled and OnLose runs with election.ReasonClosed, since the process
// lives on. Close after Crash does nothing. Crash is safe to call
// concurrently with anything but must not be called from n's callbacks.
func Crash(n *server.Node) { hooks.CrashNode(n) }
