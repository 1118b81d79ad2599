package server

import "github.com/batonhq/baton/internal/hooks"

func init() { hooks.CrashNode = func(n any) { n.(*Node).crash() } }
