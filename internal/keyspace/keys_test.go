package keyspace

import (
	"errors"
	"strings"
	"testing"
	"unicode/utf8"
)

func TestNewKeysRejectsPrefixesThatCouldCollide(t *testing.T) {
	for _, p := range []string{"baton", "/baton/", "/a//b", "/a/../b", "/a/./b", "/", "/a\x00b", "/\xff", "/" + strings.Repeat("a", 600)} {
		if _, err := New(p); !errors.Is(err, ErrInvalidPrefix) {
			t.Errorf("NewKeys(%q) = %v, want ErrInvalidPrefix", p, err)
		}
	}
	for _, p := range []string{"", "/baton", "/a/b-c/d_e", "/x.y"} {
		if _, err := New(p); err != nil {
			t.Errorf("NewKeys(%q) = %v, want nil", p, err)
		}
	}
}

func TestKeyLayoutMatchesTheDesign(t *testing.T) {
	k, _ := New("")
	name, err := k.AppName("powerjob-worker-samples")
	if err != nil {
		t.Fatal(err)
	}
	srv, _ := k.Server("srv-1")
	for got, want := range map[string]string{
		k.AppSeq():      "/baton/apps/seq",
		name:            "/baton/apps/names/powerjob-worker-samples",
		k.AppID(42):     "/baton/apps/ids/42",
		k.Owner(42):     "/baton/current-server/42",
		k.Lock(42):      "/baton/locks/42/",
		srv:             "/baton/servers/srv-1",
		k.Prefix():      "/baton",
		k.OwnerPrefix(): "/baton/current-server/",
	} {
		if got != want {
			t.Errorf("got %q, want %q", got, want)
		}
	}
	if id, err := k.AppIDFromOwnerKey("/baton/current-server/42"); err != nil || id != 42 {
		t.Errorf("AppIDFromOwnerKey = %d, %v", id, err)
	}
	for _, bad := range []string{"/baton/current-server/042", "/baton/current-server/-1", "/baton/current-server/0", "/baton/current-server/4/2", "/other/current-server/4"} {
		if _, err := k.AppIDFromOwnerKey(bad); err == nil {
			t.Errorf("AppIDFromOwnerKey(%q) accepted", bad)
		}
	}
	if id, err := k.ServerIDFromKey(srv); err != nil || id != "srv-1" {
		t.Errorf("ServerIDFromKey = %q, %v", id, err)
	}
}

// appNameSeeds are the names the issue names plus the usual suspects; they
// run as ordinary tests and seed the fuzzer.
var appNameSeeds = []string{
	"", "a", "../x", "..", ".", "a/b", "/", "%2F", "%", "%%", "%zz", "a%2Fb",
	"app.name", "名前", "tab\there", "nul\x00", "del\x7f", "c1\u0085", "\xff\xfe",
	strings.Repeat("a", 128), strings.Repeat("a", 129), strings.Repeat("é", 64),
	strings.Repeat("x", 1<<20),
}

func TestAppNameKeysStayInTheirSlot(t *testing.T) {
	for _, name := range appNameSeeds {
		checkAppNameKey(t, name)
	}
}

func FuzzAppNameKey(f *testing.F) {
	for _, s := range appNameSeeds {
		f.Add(s)
	}
	f.Fuzz(checkAppNameKey)
}

// checkAppNameKey asserts the whole contract of Keys.AppName for one
// input: invalid names are refused with ErrInvalidAppName; valid names
// give a key in the names slot whose last segment has no "/", no ".",
// decodes back to exactly the name, and so cannot be shared by another
// name.
func checkAppNameKey(t *testing.T, name string) {
	keys, _ := New("/p")
	key, err := keys.AppName(name)
	valid := ValidateName("name", name) == nil
	if !valid {
		if !errors.Is(err, ErrInvalidAppName) || key != "" {
			t.Fatalf("AppName(%q) = %q, %v; want ErrInvalidAppName", name, key, err)
		}
		if len(name) > 0 && len(name) <= MaxNameBytes && utf8.ValidString(name) && !hasControl(name) {
			t.Fatalf("ValidateName(%q) refused a name that follows every rule", name)
		}
		return
	}
	if err != nil {
		t.Fatalf("AppName(%q) = %v for a valid name", name, err)
	}
	seg, ok := strings.CutPrefix(key, "/p/apps/names/")
	if !ok || seg == "" || strings.ContainsAny(seg, "/.") {
		t.Fatalf("AppName(%q) = %q leaves its slot", name, key)
	}
	if got, err := unescape(seg); err != nil || got != name {
		t.Fatalf("segment %q of %q decodes to %q, %v", seg, name, got, err)
	}
}

func hasControl(s string) bool {
	for _, r := range s {
		if r < 0x20 || (r >= 0x7f && r < 0xa0) {
			return true
		}
	}
	return false
}

func TestServerKeysAreValidatedToo(t *testing.T) {
	k, _ := New("")
	if _, err := k.Server("a/../../b"); err != nil {
		t.Fatalf("a/../../b is a valid (escaped) server id: %v", err)
	}
	key, _ := k.Server("a/../../b")
	if strings.Count(key, "/") != 3 {
		t.Errorf("server key %q has extra segments", key)
	}
	if _, err := k.Server(""); !errors.Is(err, ErrInvalidServerID) {
		t.Errorf("empty server id: %v", err)
	}
}
