# The ctest suite (BUILD_TESTING=ON; scripts/test_c.sh runs configure -> build -> install ->
# ctest). Every test but sfr_header_fresh and sfr_plain_configure uses the INSTALLED package
# under CMAKE_INSTALL_PREFIX, so run `cmake --install` before ctest.
#   sfr_header_fresh       include/sfr.h equals a fresh cbindgen run; version macros = Cargo.toml
#   sfr_soname             libsfr.so.X.Y.Z with SONAME libsfr.so.0.Y and both links
#   sfr_exports            the library exports exactly sfr.h's functions (sfr_*), nothing else
#   sfr_installed_runpath  RUNPATH $ORIGIN + libtorch, no LD_LIBRARY_PATH, libtorch_cuda NEEDED
#   sfr_relocatable        a moved prefix runs (libtorch outside and inside the prefix)
#   sfr_pkgconfig          pkg-config flags for the prefix and for a /usr multiarch package
#   sfr_plain_configure    configure/build/install without test tools; tests on without valgrind
#   sfr_c_api              tests/c: every C function incl. misuse, under valgrind memcheck
#   sfr_cpp_itk            tests/cpp: an ITK program (NIfTI in/out, training job, geometry)
#   sfr_consumer           tests/consumer: a separate project using find_package(SFR)
# Tools: cbindgen, readelf/nm (binutils), pkg-config, valgrind (sfr_c_api; or
# SFR_C_TEST_TOOL=asan|none), ITK (sfr_cpp_itk). scripts/setup.sh installs them all.
set(SFR_INSTALLED_LIBDIR "${CMAKE_INSTALL_PREFIX}/${CMAKE_INSTALL_LIBDIR}")
set(SFR_INSTALLED_LIB "${SFR_INSTALLED_LIBDIR}/${SFR_REALNAME}")
set(SFR_C_TEST_TOOL "valgrind" CACHE STRING "How sfr_c_api runs the C program: valgrind, asan or none")
set_property(CACHE SFR_C_TEST_TOOL PROPERTY STRINGS valgrind asan none)
find_program(SFR_NM nm)
find_program(SFR_PKG_CONFIG pkg-config)
foreach(tool SFR_READELF SFR_NM SFR_PKG_CONFIG)
  if(NOT ${tool})
    message(WARNING "${tool} was not found: the tests that use it will fail")
  endif()
endforeach()
# What the scripts that configure and build projects themselves need to do it the same way.
set(SFR_TEST_TOOLCHAIN "-DGENERATOR=${CMAKE_GENERATOR}" "-DMAKE=${CMAKE_MAKE_PROGRAM}"
    "-DC_COMPILER=${CMAKE_C_COMPILER}" "-DSOURCE_DIR=${PROJECT_SOURCE_DIR}"
    "-DCARGO_TARGET_DIR=${SFR_CARGO_TARGET_DIR}" "-DVERSION=${PROJECT_VERSION}"
    "-DLIBDIR=${CMAKE_INSTALL_LIBDIR}" "-DREALNAME=${SFR_REALNAME}" "-DSONAME=${SFR_SONAME}")

find_program(SFR_CBINDGEN cbindgen HINTS "$ENV{HOME}/.cargo/bin")
add_test(NAME sfr_header_fresh
  COMMAND "${CMAKE_COMMAND}" "-DCBINDGEN=${SFR_CBINDGEN}" "-DSOURCE_DIR=${PROJECT_SOURCE_DIR}"
          "-DOUT=${PROJECT_BINARY_DIR}/sfr.h.fresh" "-DVERSION=${PROJECT_VERSION}"
          -P "${PROJECT_SOURCE_DIR}/cmake/check_header.cmake")

add_test(NAME sfr_soname
  COMMAND "${CMAKE_COMMAND}" "-DLIBDIR=${SFR_INSTALLED_LIBDIR}" "-DREALNAME=${SFR_REALNAME}"
          "-DSONAME=${SFR_SONAME}" "-DBUILT=${SFR_LIBRARY_FILE}" "-DREADELF=${SFR_READELF}"
          -P "${PROJECT_SOURCE_DIR}/cmake/check_soname.cmake")

add_test(NAME sfr_exports
  COMMAND "${CMAKE_COMMAND}" "-DLIB=${SFR_INSTALLED_LIB}" "-DHEADER=${PROJECT_SOURCE_DIR}/include/sfr.h"
          "-DNM=${SFR_NM}" -P "${PROJECT_SOURCE_DIR}/cmake/check_exports.cmake")

add_test(NAME sfr_installed_runpath
  COMMAND "${CMAKE_COMMAND}" "-DLIB=${SFR_INSTALLED_LIB}" "-DREADELF=${SFR_READELF}"
          "-DBUILD_TREE=${PROJECT_SOURCE_DIR}" -P "${PROJECT_SOURCE_DIR}/cmake/check_runpath.cmake")

add_test(NAME sfr_relocatable
  COMMAND "${CMAKE_COMMAND}" ${SFR_TEST_TOOLCHAIN} "-DPREFIX=${CMAKE_INSTALL_PREFIX}"
          "-DWORK=${PROJECT_BINARY_DIR}/tests/relocatable" "-DREADELF=${SFR_READELF}"
          -P "${PROJECT_SOURCE_DIR}/cmake/check_relocation.cmake")

add_test(NAME sfr_pkgconfig
  COMMAND "${CMAKE_COMMAND}" ${SFR_TEST_TOOLCHAIN} "-DPREFIX=${CMAKE_INSTALL_PREFIX}"
          "-DINCLUDEDIR=${CMAKE_INSTALL_INCLUDEDIR}" "-DWORK=${PROJECT_BINARY_DIR}/tests/pkgconfig"
          "-DPKG_CONFIG=${SFR_PKG_CONFIG}" -P "${PROJECT_SOURCE_DIR}/cmake/check_pkgconfig.cmake")

add_test(NAME sfr_plain_configure
  COMMAND "${CMAKE_COMMAND}" ${SFR_TEST_TOOLCHAIN} "-DWORK=${PROJECT_BINARY_DIR}/tests/plain"
          "-DCTEST=${CMAKE_CTEST_COMMAND}" -P "${PROJECT_SOURCE_DIR}/cmake/check_plain_configure.cmake")
# The programs must find libsfr and libtorch by RUNPATH alone.
set_tests_properties(sfr_installed_runpath sfr_relocatable sfr_pkgconfig PROPERTIES ENVIRONMENT "LD_LIBRARY_PATH=")

# Each program is a separate CMake project configured and built by ctest itself against the
# installed package, as a user's project would be.
function(sfr_build_and_test name src)
  cmake_parse_arguments(A "" "TIMEOUT" "OPTIONS;COMMAND" ${ARGN})
  set(bin "${PROJECT_BINARY_DIR}/tests/${name}")
  add_test(NAME ${name}
    COMMAND "${CMAKE_CTEST_COMMAND}" --build-and-test "${src}" "${bin}"
            --build-generator "${CMAKE_GENERATOR}" --build-makeprogram "${CMAKE_MAKE_PROGRAM}"
            --build-noclean
            --build-options "-DCMAKE_PREFIX_PATH=${CMAKE_INSTALL_PREFIX}" -DCMAKE_BUILD_TYPE=RelWithDebInfo
                            "-DCMAKE_C_COMPILER=${CMAKE_C_COMPILER}" ${A_OPTIONS}
            --test-command ${A_COMMAND})
  # The installed library must find libtorch by itself.
  set_tests_properties(${name} PROPERTIES ENVIRONMENT "LD_LIBRARY_PATH=" TIMEOUT ${A_TIMEOUT})
endfunction()

set(c_bin "${PROJECT_BINARY_DIR}/tests/sfr_c_api")
if(SFR_C_TEST_TOOL STREQUAL "valgrind")
  # Looked for only here: building and installing the library never needs valgrind.
  find_program(SFR_VALGRIND valgrind)
  if(SFR_VALGRIND AND EXISTS "${SFR_VALGRIND}")
    # Any memory error, or a definite leak (--errors-for-leak-kinds=definite), fails the test.
    # One suppression, for a false positive inside glibc's ld.so (see tests/c/valgrind.supp).
    # "Possibly lost" / "still reachable" blocks are not errors: they are the process-lifetime
    # caches and thread-pool stacks of libtorch and glibc.
    set(c_cmd "${SFR_VALGRIND}" --error-exitcode=97 --leak-check=full --show-leak-kinds=definite
              --errors-for-leak-kinds=definite --num-callers=30
              "--suppressions=${PROJECT_SOURCE_DIR}/tests/c/valgrind.supp" "${c_bin}/sfr_c_test")
  else()
    message(WARNING "valgrind was not found: the test sfr_c_api will fail saying so. Install valgrind "
                    "(scripts/setup.sh does) or configure with -DSFR_C_TEST_TOOL=none or asan.")
    set(c_cmd "")
  endif()
  set(c_opts "-DSFR_SANITIZE=OFF")
elseif(SFR_C_TEST_TOOL STREQUAL "asan")
  set(c_cmd "${c_bin}/sfr_c_test")
  set(c_opts "-DSFR_SANITIZE=ON")
else()
  set(c_cmd "${c_bin}/sfr_c_test")
  set(c_opts "-DSFR_SANITIZE=OFF")
endif()
if(c_cmd)
  sfr_build_and_test(sfr_c_api "${PROJECT_SOURCE_DIR}/tests/c" OPTIONS ${c_opts} COMMAND ${c_cmd} TIMEOUT 1200)
else()
  add_test(NAME sfr_c_api COMMAND "${CMAKE_COMMAND}" -E echo
           "sfr_c_api needs valgrind (SFR_C_TEST_TOOL=valgrind) and none was found: install valgrind or reconfigure with -DSFR_C_TEST_TOOL=none or asan")
  set_tests_properties(sfr_c_api PROPERTIES FAIL_REGULAR_EXPRESSION "needs valgrind")
endif()

sfr_build_and_test(sfr_cpp_itk "${PROJECT_SOURCE_DIR}/tests/cpp"
  COMMAND "${PROJECT_BINARY_DIR}/tests/sfr_cpp_itk/sfr_itk_test" "${PROJECT_BINARY_DIR}/tests/sfr_cpp_itk/out"
  TIMEOUT 1200)

sfr_build_and_test(sfr_consumer "${PROJECT_SOURCE_DIR}/tests/consumer"
  OPTIONS "-DSFR_EXPECTED_VERSION=${PROJECT_VERSION}"
  COMMAND "${PROJECT_BINARY_DIR}/tests/sfr_consumer/sfr_consumer"
  TIMEOUT 300)
